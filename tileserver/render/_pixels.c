/* Pixel-wise uint8 kernels of the encoders, in one pass over interleaved pixels: numpy works
 * band by band on strided views there, several passes and temporaries per band.
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
    result = Py_None;
    Py_INCREF(result);
done:
    RELEASE_BUFFERS(&colour, &alpha, &bg, &out);
    return result;
}

static PyMethodDef methods[] = {
    {"over_background", over_background, METH_VARARGS, "Alpha over a background colour, exact in integers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pixels", "Pixel-wise uint8 kernels of the encoders (see _pixels.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__pixels(void)
{
    return PyModule_Create(&module);
}
