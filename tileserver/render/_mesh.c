/* Pillow's MESH transform with its bicubic filter, for uint8 pictures held in numpy arrays: the
 * same bytes as Image.transform(size, MESH, quads, BICUBIC), without its per-pixel function
 * pointers and per-band recomputation (~150 ns a pixel for 4 bands there).
 *
 * Facts followed (Pillow's src/libImaging/Geometry.c, read for them): a quad maps output pixel
 * (x, y) of its box, at x - x0 + 0.5 and y - y0 + 0.5, to a0 + a1*x + a2*y + a3*x*y (and a4..a7);
 * a source point off [0, size) gives 0 in every band; the cubic is Pillow's (a = -1, the
 * p1..p4 polynomial below), columns clamped into the source, rows past its edges repeating the
 * previous row's sum; the sum is truncated into 0..255, not rounded. Doubles throughout, in
 * Pillow's order of operations, and this file is compiled without FMA contraction
 * (-ffp-contract=off, setup.py) so every product rounds as Pillow's do.
 */
#include "_buffers.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline int
floor_int(double v)
{
    return v < 0.0 ? (int)floor(v) : (int)v;
}

static inline int
clamp(int v, int size)
{
    return v < 0 ? 0 : v < size ? v : size - 1;
}


/* The bands of a pixel side by side: the same double operations lane by lane as Pillow's per-band
 * code, so the same results (AVX2 has no FMA, and contraction is off). */
typedef double v4df __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v4df
cubic(v4df v1, v4df v2, v4df v3, v4df v4, double d)
{
    v4df p1 = v2;
    v4df p2 = -v1 + v3;
    v4df p3 = 2 * (v1 - v2) + v3 - v4;
    v4df p4 = -v1 + v2 - v3 + v4;
    return p1 + d * (p2 + d * (p3 + d * p4));
}

typedef uint8_t v4qu __attribute__((vector_size(4)));

static inline __attribute__((always_inline)) v4df
load(const uint8_t *p, int bands)
{
    v4qu q = {0, 0, 0, 0};
    memcpy(&q, p, (size_t)bands); /* 4 bytes in one move for RGBa; never past the pixel */
    return __builtin_convertvector(q, v4df);
}

/* One output pixel of `bands` bands (a constant once inlined) from the source (height, width,
 * bands) at (xx, yy). */
static inline __attribute__((always_inline)) void
bicubic_pixel(uint8_t *o, const uint8_t *src, int height, int width, int bands, double xx, double yy)
{
    if (xx < 0.0 || xx >= width || yy < 0.0 || yy >= height) {
        memset(o, 0, (size_t)bands);
        return;
    }
    xx -= 0.5;
    yy -= 0.5;
    int x = floor_int(xx), y = floor_int(yy);
    double dx = xx - x, dy = yy - y;
    x--;
    y--;
    Py_ssize_t c0 = (Py_ssize_t)clamp(x, width) * bands, c1 = (Py_ssize_t)clamp(x + 1, width) * bands;
    Py_ssize_t c2 = (Py_ssize_t)clamp(x + 2, width) * bands, c3 = (Py_ssize_t)clamp(x + 3, width) * bands;
    Py_ssize_t stride = (Py_ssize_t)width * bands;
    const uint8_t *r = src + clamp(y, height) * stride;
    v4df v1 = cubic(load(r + c0, bands), load(r + c1, bands), load(r + c2, bands), load(r + c3, bands), dx);
    v4df v2 = v1, v3, v4;
    if (y + 1 >= 0 && y + 1 < height) {
        r = src + (y + 1) * stride;
        v2 = cubic(load(r + c0, bands), load(r + c1, bands), load(r + c2, bands), load(r + c3, bands), dx);
    }
    v3 = v2;
    if (y + 2 >= 0 && y + 2 < height) {
        r = src + (y + 2) * stride;
        v3 = cubic(load(r + c0, bands), load(r + c1, bands), load(r + c2, bands), load(r + c3, bands), dx);
    }
    v4 = v3;
    if (y + 3 >= 0 && y + 3 < height) {
        r = src + (y + 3) * stride;
        v4 = cubic(load(r + c0, bands), load(r + c1, bands), load(r + c2, bands), load(r + c3, bands), dx);
    }
    v4df v = cubic(v1, v2, v3, v4, dy);
    for (int b = 0; b < bands; b++)
        o[b] = v[b] <= 0.0 ? 0 : v[b] >= 255.0 ? 255 : (uint8_t)v[b];
}

/* One quad's box of output pixels; `bands` a constant once inlined. */
static inline __attribute__((always_inline)) void
quad_n(uint8_t *o, Py_ssize_t out_width, const uint8_t *in, int height, int width, int bands,
       Py_ssize_t x0, Py_ssize_t y0, Py_ssize_t x1, Py_ssize_t y1, const double *a)
{
    for (Py_ssize_t y = y0; y < y1; y++) {
        double yin = (double)(y - y0) + 0.5;
        uint8_t *row = o + (y * out_width) * bands;
        for (Py_ssize_t x = x0; x < x1; x++) {
            double xin = (double)(x - x0) + 0.5;
            double xx = a[0] + a[1] * xin + a[2] * yin + a[3] * xin * yin;
            double yy = a[4] + a[5] * xin + a[6] * yin + a[7] * xin * yin;
            bicubic_pixel(row + x * bands, in, height, width, bands, xx, yy);
        }
    }
}

VECTOR_CLONES static void
quad(uint8_t *o, Py_ssize_t out_width, const uint8_t *in, int height, int width, int bands,
     Py_ssize_t x0, Py_ssize_t y0, Py_ssize_t x1, Py_ssize_t y1, const double *a)
{
    switch (bands) {
    case 4: quad_n(o, out_width, in, height, width, 4, x0, y0, x1, y1, a); break;
    case 3: quad_n(o, out_width, in, height, width, 3, x0, y0, x1, y1, a); break;
    case 2: quad_n(o, out_width, in, height, width, 2, x0, y0, x1, y1, a); break;
    default: quad_n(o, out_width, in, height, width, 1, x0, y0, x1, y1, a); break;
    }
}

/* mesh_bicubic(src, height, width, bands, boxes, coefficients, out, out_height, out_width)
 * src: uint8 (height, width, bands), bands 1-4, alpha already premultiplied as Pillow does;
 * boxes: int32 (Q, 4) target boxes; coefficients: float64 (Q, 8), Pillow's QUAD data;
 * out: uint8 (out_height, out_width, bands), written inside the boxes. */
static PyObject *
mesh_bicubic(PyObject *self, PyObject *args)
{
    Py_buffer src = {0}, boxes = {0}, coefficients = {0}, out = {0};
    Py_ssize_t height, width, bands, out_height, out_width;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*w*nn", &src, &height, &width, &bands, &boxes, &coefficients,
                          &out, &out_height, &out_width))
        goto done;
    Py_ssize_t quads = boxes.len / (4 * 4);
    if (bands < 1 || bands > 4 || height < 1 || width < 1 || height > INT32_MAX || width > INT32_MAX
        || src.len != height * width * bands || boxes.len != quads * 16 || coefficients.len != quads * 64
        || out.len != out_height * out_width * bands) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    const uint8_t *in = src.buf;
    const int32_t *box = boxes.buf;
    const double *coef = coefficients.buf;
    uint8_t *o = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t q = 0; q < quads; q++) {
        const int32_t *b = box + 4 * q;
        const double *a = coef + 8 * q;
        Py_ssize_t x0 = b[0] < 0 ? 0 : b[0], y0 = b[1] < 0 ? 0 : b[1];
        Py_ssize_t x1 = b[2] > out_width ? out_width : b[2], y1 = b[3] > out_height ? out_height : b[3];
        quad(o, out_width, in, (int)height, (int)width, (int)bands, x0, y0, x1, y1, a);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&src, &boxes, &coefficients, &out);
    return result;
}

static PyMethodDef methods[] = {
    {"mesh_bicubic", mesh_bicubic, METH_VARARGS, "Pillow's bicubic MESH transform of a uint8 picture."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mesh", "Pillow's bicubic mesh transform (see _mesh.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__mesh(void)
{
    return PyModule_Create(&module);
}
