/* Pixel-wise uint8 kernels of styles and encoders, in one pass over interleaved pixels: numpy
 * works band by band on strided views there, several passes and temporaries per band.
 *
 * rgba: a layer's pixels as RGBA for compositing (draw.to_rgba): grey replicated, the alpha its
 * alpha band, its validity (0 or 255), or both ANDed.
 *
 * on_background: a layer's pixels where valid, a background colour elsewhere, as RGB (draw.composite
 * for maps that are flattened anyway: JPEG, TRANSPARENT=FALSE).
 *
 * colorize: ROK4's colorize style on uint8 pixels (styles._colorize_uint8): a pixel whose first
 * bands are each within the tolerance of the source colour becomes the destination colour; the
 * others keep their bands (255 for an alpha band they lack).
 *
 * over_background: a picture with an alpha band laid on a background colour for JPEG,
 * round(c*a/255 + bg*(1 - a/255)) exactly, in integers: x = c*a + bg*(255 - a) + 128 and
 * (x + (x >> 8)) >> 8 (encode._over_background's formula, exact for every colour, alpha and
 * background; an opaque pixel keeps its colour, a transparent one gets the background).
 */
#include "_buffers.h"
#include <stdint.h>


/* `bands` a constant once inlined */
static inline __attribute__((always_inline)) void
over_n(uint8_t *out, const uint8_t *colour, Py_ssize_t colour_step, const uint8_t *alpha,
       Py_ssize_t alpha_step, const uint8_t *bg, Py_ssize_t pixels, int bands)
{
    for (Py_ssize_t i = 0; i < pixels; i++) {
        uint32_t a = alpha[i * alpha_step];
        if (a == 255) { /* maps are mostly opaque: long runs, a predictable branch */
            for (int b = 0; b < bands; b++)
                out[i * bands + b] = colour[i * colour_step + b];
            continue;
        }
        for (int b = 0; b < bands; b++) {
            uint32_t x = colour[i * colour_step + b] * a + bg[b] * (255 - a) + 128;
            out[i * bands + b] = (uint8_t)((x + (x >> 8)) >> 8);
        }
    }
}

VECTOR_CLONES static void
over(uint8_t *out, const uint8_t *colour, Py_ssize_t colour_step, const uint8_t *alpha,
     Py_ssize_t alpha_step, const uint8_t *bg, Py_ssize_t pixels, int bands)
{
    switch (bands) {
    case 3: over_n(out, colour, colour_step, alpha, alpha_step, bg, pixels, 3); break;
    default: over_n(out, colour, colour_step, alpha, alpha_step, bg, pixels, 1); break;
    }
}

/* over_background(colour, colour_step, alpha, alpha_step, bg, out, pixels)
 * colour: uint8, pixel i's bands at i*colour_step; alpha: pixel i's at i*alpha_step (the last band
 * of the same buffer, or a plane); bg: 1 or 3 bytes; out: uint8 (pixels, len(bg)). */
static PyObject *
over_background(PyObject *self, PyObject *args)
{
    Py_buffer colour = {0}, alpha = {0}, bg = {0}, out = {0};
    Py_ssize_t colour_step, alpha_step, pixels;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*ny*w*n", &colour, &colour_step, &alpha, &alpha_step, &bg, &out,
                          &pixels))
        goto done;
    Py_ssize_t bands = bg.len;
    if ((bands != 1 && bands != 3) || pixels < 0 || colour_step < bands || alpha_step < 1
        || out.len != pixels * bands
        || (pixels > 0 && (colour.len < (pixels - 1) * colour_step + bands
                           || alpha.len < (pixels - 1) * alpha_step + 1))) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    over(out.buf, colour.buf, colour_step, alpha.buf, alpha_step, bg.buf, pixels, (int)bands);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&colour, &alpha, &bg, &out);
    return result;
}

/* `channels` constant once inlined; `valid` NULL: the alpha band alone */
static inline __attribute__((always_inline)) void
rgba_n(uint8_t *restrict out, const uint8_t *restrict data, const uint8_t *restrict valid, Py_ssize_t pixels,
       int channels)
{
    int grey = channels < 3, has_alpha = channels == 2 || channels == 4;
    for (Py_ssize_t i = 0; i < pixels; i++) {
        const uint8_t *px = data + i * channels;
        uint8_t *o = out + 4 * i;
        o[0] = px[0];
        o[1] = px[grey ? 0 : 1];
        o[2] = px[grey ? 0 : 2];
        uint8_t mask = valid == NULL ? 255 : (uint8_t)(0u - (valid[i] != 0));
        o[3] = (has_alpha ? px[channels - 1] : 255) & mask;
    }
}

VECTOR_CLONES static void
rgba_all(uint8_t *out, const uint8_t *data, const uint8_t *valid, Py_ssize_t pixels, int channels)
{
    switch (channels) {
    case 1: rgba_n(out, data, valid, pixels, 1); break;
    case 2: rgba_n(out, data, valid, pixels, 2); break;
    case 3: rgba_n(out, data, valid, pixels, 3); break;
    default: rgba_n(out, data, valid, pixels, 4); break;
    }
}

/* rgba(data, channels, valid, out, pixels)
 * data: uint8 (pixels, channels 1..4); valid: bool (pixels), or empty for an alpha band alone
 * (1 and 3 bands need it); out: uint8 (pixels, 4). */
static PyObject *
rgba(PyObject *self, PyObject *args)
{
    Py_buffer data = {0}, valid = {0}, out = {0};
    Py_ssize_t channels, pixels;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*w*n", &data, &channels, &valid, &out, &pixels))
        goto done;
    int has_valid = valid.len > 0;
    if (channels < 1 || channels > 4 || pixels < 0 || data.len != pixels * channels || out.len != pixels * 4
        || (has_valid && valid.len != pixels) || (!has_valid && pixels > 0 && channels % 2 == 1)) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rgba_all(out.buf, data.buf, has_valid ? valid.buf : NULL, pixels, (int)channels);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&data, &valid, &out);
    return result;
}

/* `channels` constant once inlined */
static inline __attribute__((always_inline)) void
on_background_n(uint8_t *restrict out, const uint8_t *restrict data, const uint8_t *restrict valid,
                const uint8_t *bg, Py_ssize_t pixels, int channels)
{
    int grey = channels < 3;
    for (Py_ssize_t i = 0; i < pixels; i++) {
        const uint8_t *px = data + i * channels;
        uint8_t *o = out + 3 * i, pick = (uint8_t)(0u - (valid[i] != 0));
        o[0] = (uint8_t)((px[0] & pick) | (bg[0] & (uint8_t)~pick));
        o[1] = (uint8_t)((px[grey ? 0 : 1] & pick) | (bg[1] & (uint8_t)~pick));
        o[2] = (uint8_t)((px[grey ? 0 : 2] & pick) | (bg[2] & (uint8_t)~pick));
    }
}

VECTOR_CLONES static void
on_background_all(uint8_t *out, const uint8_t *data, const uint8_t *valid, const uint8_t *bg, Py_ssize_t pixels,
                  int channels)
{
    if (channels == 3)
        on_background_n(out, data, valid, bg, pixels, 3);
    else
        on_background_n(out, data, valid, bg, pixels, 1);
}

/* on_background(data, channels, valid, bg, out, pixels)
 * data: uint8 (pixels, channels 1 or 3); valid: bool (pixels); bg: 3 bytes; out: uint8 (pixels, 3). */
static PyObject *
on_background(PyObject *self, PyObject *args)
{
    Py_buffer data = {0}, valid = {0}, bg = {0}, out = {0};
    Py_ssize_t channels, pixels;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*y*w*n", &data, &channels, &valid, &bg, &out, &pixels))
        goto done;
    if ((channels != 1 && channels != 3) || pixels < 0 || data.len != pixels * channels || valid.len != pixels
        || bg.len != 3 || out.len != pixels * 3) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    on_background_all(out.buf, data.buf, valid.buf, bg.buf, pixels, (int)channels);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&data, &valid, &bg, &out);
    return result;
}

/* `channels`, `n` and `bands` constants once inlined; no branch a pixel (a mask picks the
 * destination or the pixel's own bands), so the loop vectorises. |v - s| <= t as one unsigned
 * comparison: v - s + t in [0, 2t]. */
static inline __attribute__((always_inline)) void
colorize_n(uint8_t *restrict out, const uint8_t *restrict data, Py_ssize_t pixels, int channels,
           const int32_t *source, int n, int32_t tolerance, const uint8_t *dest, int bands)
{
    /* a negative tolerance matches nothing */
    uint32_t any = tolerance >= 0, limit = tolerance >= 0 ? 2 * (uint32_t)tolerance : 0;
    int32_t shift[4];
    for (int b = 0; b < n; b++)
        shift[b] = (tolerance >= 0 ? tolerance : 0) - source[b];
    for (Py_ssize_t i = 0; i < pixels; i++) {
        const uint8_t *px = data + i * channels;
        uint32_t match = any;
        for (int b = 0; b < n; b++)
            match &= (uint32_t)((int32_t)px[b] + shift[b]) <= limit;
        uint8_t pick = (uint8_t)(0u - match);
        uint8_t *o = out + i * bands;
        for (int b = 0; b < bands; b++) {
            uint8_t own = b < channels ? px[b] : 255;
            o[b] = (uint8_t)((dest[b] & pick) | (own & (uint8_t)~pick));
        }
    }
}

VECTOR_CLONES static void
colorize_all(uint8_t *out, const uint8_t *data, Py_ssize_t pixels, int channels, const int32_t *source, int n,
             int32_t tolerance, const uint8_t *dest, int bands)
{
    if (channels == 4 && n == 3 && bands == 3)
        colorize_n(out, data, pixels, 4, source, 3, tolerance, dest, 3);
    else if (channels == 3 && n == 3 && bands == 3)
        colorize_n(out, data, pixels, 3, source, 3, tolerance, dest, 3);
    else if (channels == 4 && n == 4 && bands == 4)
        colorize_n(out, data, pixels, 4, source, 4, tolerance, dest, 4);
    else if (channels == 3 && n == 3 && bands == 4)
        colorize_n(out, data, pixels, 3, source, 3, tolerance, dest, 4);
    else
        colorize_n(out, data, pixels, channels, source, n, tolerance, dest, bands);
}

/* colorize(data, channels, source, tolerance, dest, out, pixels)
 * data: uint8 (pixels, channels); source: int32 (n <= channels); tolerance: the integer one (< 0:
 * nothing matches); dest: uint8 (bands); out: uint8 (pixels, bands). */
static PyObject *
colorize(PyObject *self, PyObject *args)
{
    Py_buffer data = {0}, source = {0}, dest = {0}, out = {0};
    Py_ssize_t channels, pixels;
    int tolerance;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*iy*w*n", &data, &channels, &source, &tolerance, &dest, &out, &pixels))
        goto done;
    Py_ssize_t n = source.len / 4, bands = dest.len;
    if (channels < 1 || channels > 4 || bands < 1 || bands > 4 || source.len % 4 != 0 || n > channels
        || pixels < 0 || data.len != pixels * channels || out.len != pixels * bands) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    colorize_all(out.buf, data.buf, pixels, (int)channels, source.buf, (int)n, tolerance, dest.buf, (int)bands);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&data, &source, &dest, &out);
    return result;
}

static PyMethodDef methods[] = {
    {"rgba", rgba, METH_VARARGS, "A layer's uint8 pixels and validity as RGBA."},
    {"on_background", on_background, METH_VARARGS, "A layer's valid pixels on a background colour, as RGB."},
    {"colorize", colorize, METH_VARARGS, "ROK4's colorize style on interleaved uint8 pixels."},
    {"over_background", over_background, METH_VARARGS, "Alpha over a background colour, exact in integers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pixels", "Pixel-wise uint8 kernels of styles and encoders (see _pixels.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__pixels(void)
{
    return PyModule_Create(&module);
}
