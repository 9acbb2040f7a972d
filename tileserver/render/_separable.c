/* Separable resampling in C: the same taps and sums as render/banded.py, without BLAS's wasted
 * multiplications or the float planes of uint8 pictures.
 *
 * Each output row is made in two passes over one line that stays in cache:
 *   1. vertical: the line is the weighted sum of the few source rows the row's taps name — a
 *      contiguous axpy per tap, which the compiler vectorises (an AVX2 clone where the CPU has it);
 *   2. horizontal: each output pixel sums its taps out of that line, its channels (or up to four
 *      planes, interleaved first) side by side in one vector of four.
 * uint8 pictures are read interleaved (H, W, C) and written interleaved, rounded half to even and
 * clipped to 0..255, with float sums. Float32 planes are read (H, P, W) and written (H', P, W'),
 * with float sums, or double ones for data far from 0 (a DEM's altitudes: float32 sums there lose
 * the differences a slope or a hillshade is made of).
 *
 * Taps come from warp._taps, transposed to (N, K): indices clipped into the source (an index
 * repeated at an edge carries weight 0) and float32 weights. No numpy headers: arrays arrive as
 * buffers and the Python side (render/separable.py) checks their types and contiguity; sizes and
 * indices are checked here.
 */
#include "_buffers.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


/* line[j] = sum_k w[k] * rows[k][j], j < n, for uint8 rows */
VECTOR_CLONES static void
vertical_u8(float *line, const uint8_t *const *rows, const float *w, Py_ssize_t taps, Py_ssize_t n)
{
    const uint8_t *r0 = rows[0];
    float w0 = w[0];
    for (Py_ssize_t j = 0; j < n; j++)
        line[j] = w0 * (float)r0[j];
    for (Py_ssize_t k = 1; k < taps; k++) {
        const uint8_t *r = rows[k];
        float wk = w[k];
        if (wk == 0.0f)
            continue;
        for (Py_ssize_t j = 0; j < n; j++)
            line[j] += wk * (float)r[j];
    }
}

static inline uint8_t
to_u8(float v)
{
    long r = lrintf(v); /* half to even, as numpy's rint; inlined with -fno-math-errno */
    return r <= 0 ? 0 : r >= 255 ? 255 : (uint8_t)r;
}

/* Four floats in one register where the target has them (SSE, NEON): the horizontal pass sums a
 * pixel's channels (or a row's planes) side by side. Loads go through memcpy: unaligned. */
typedef float v4sf __attribute__((vector_size(16)));

static inline __attribute__((always_inline)) v4sf
load4(const float *p)
{
    v4sf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* out[x*C + c] = rounded sum_k w[x][k] * line[idx[x][k]*C + c], c < C <= 4: one vector of 4 per
 * tap (the line carries 4 spare floats at its end for the last pixel's load). Inlined with a
 * constant tap count for the usual kernels, so the tap loop unrolls. */
static inline __attribute__((always_inline)) void
horizontal_u8_taps(uint8_t *out, const float *line, const int32_t *idx, const float *w,
                   Py_ssize_t taps, Py_ssize_t count, int channels)
{
    for (Py_ssize_t x = 0; x < count; x++) {
        const int32_t *ix = idx + x * taps;
        const float *wx = w + x * taps;
        v4sf acc = wx[0] * load4(line + (Py_ssize_t)ix[0] * channels), odd = {0.0f, 0.0f, 0.0f, 0.0f};
        Py_ssize_t k = 1;
        for (; k + 1 < taps; k += 2) { /* two chains of additions: half the latency */
            odd += wx[k] * load4(line + (Py_ssize_t)ix[k] * channels);
            acc += wx[k + 1] * load4(line + (Py_ssize_t)ix[k + 1] * channels);
        }
        if (k < taps)
            odd += wx[k] * load4(line + (Py_ssize_t)ix[k] * channels);
        acc += odd;
        for (int c = 0; c < channels; c++)
            out[x * channels + c] = to_u8(acc[c]);
    }
}

static void
horizontal_u8(uint8_t *out, const float *line, const int32_t *idx, const float *w, Py_ssize_t taps,
              Py_ssize_t count, int channels)
{
#define BY_CHANNELS(T)                                                                         \
    switch (channels) {                                                                        \
    case 3: horizontal_u8_taps(out, line, idx, w, T, count, 3); break;                         \
    case 4: horizontal_u8_taps(out, line, idx, w, T, count, 4); break;                         \
    default: horizontal_u8_taps(out, line, idx, w, T, count, channels); break;                 \
    }
    switch (taps) {
    case 2: BY_CHANNELS(2) break;
    case 4: BY_CHANNELS(4) break;
    case 6: BY_CHANNELS(6) break;
    default: BY_CHANNELS(taps) break;
    }
#undef BY_CHANNELS
}

typedef double v4df __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v4df
load4d(const double *p)
{
    v4df v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* The float-plane kernels, once with float sums (T = float) and once with double ones:
 * vertical_<T>: line[j] = sum_k w[k] * rows[k][j];
 * horizontal_<T>: out[p][x] = sum_k w[x][k] * line[idx[x][k]*n + p], p < n <= 4, the line holding
 * n planes interleaved (and 4 spare values at its end): a tap is one vector of 4; the sums go back
 * to their planes, `out_stride` floats apart. Two chains of additions: half the latency. */
#define FLOAT_KERNELS(T, VEC, LOAD)                                                                    \
    VECTOR_CLONES static void vertical_##T(T *line, const float *const *rows, const float *w,          \
                                           Py_ssize_t taps, Py_ssize_t n)                              \
    {                                                                                                  \
        const float *r0 = rows[0];                                                                     \
        T w0 = w[0];                                                                                   \
        for (Py_ssize_t j = 0; j < n; j++)                                                             \
            line[j] = w0 * (T)r0[j];                                                                   \
        for (Py_ssize_t k = 1; k < taps; k++) {                                                        \
            const float *r = rows[k];                                                                  \
            T wk = w[k];                                                                               \
            if (wk == 0)                                                                               \
                continue;                                                                              \
            for (Py_ssize_t j = 0; j < n; j++)                                                         \
                line[j] += wk * (T)r[j];                                                               \
        }                                                                                              \
    }                                                                                                  \
    static inline __attribute__((always_inline)) void horizontal_##T##_n(                              \
        float *out, Py_ssize_t out_stride, const T *line, int n, const int32_t *idx, const float *w,   \
        Py_ssize_t taps, Py_ssize_t count)                                                             \
    {                                                                                                  \
        for (Py_ssize_t x = 0; x < count; x++) {                                                       \
            const int32_t *ix = idx + x * taps;                                                        \
            const float *wx = w + x * taps;                                                            \
            VEC acc = (T)wx[0] * LOAD(line + (Py_ssize_t)ix[0] * n), odd = {0, 0, 0, 0};               \
            Py_ssize_t k = 1;                                                                          \
            for (; k + 1 < taps; k += 2) {                                                             \
                odd += (T)wx[k] * LOAD(line + (Py_ssize_t)ix[k] * n);                                  \
                acc += (T)wx[k + 1] * LOAD(line + (Py_ssize_t)ix[k + 1] * n);                          \
            }                                                                                          \
            if (k < taps)                                                                              \
                odd += (T)wx[k] * LOAD(line + (Py_ssize_t)ix[k] * n);                                  \
            acc += odd;                                                                                \
            for (int p = 0; p < n; p++)                                                                \
                out[p * out_stride + x] = (float)acc[p];                                               \
        }                                                                                              \
    }                                                                                                  \
    VECTOR_CLONES static void horizontal_##T(float *out, Py_ssize_t out_stride, const T *line, int n,  \
                                             const int32_t *idx, const float *w, Py_ssize_t taps,      \
                                             Py_ssize_t count)                                         \
    {                                                                                                  \
        switch (n) {                                                                                   \
        case 4: horizontal_##T##_n(out, out_stride, line, 4, idx, w, taps, count); break;              \
        case 3: horizontal_##T##_n(out, out_stride, line, 3, idx, w, taps, count); break;              \
        case 2: horizontal_##T##_n(out, out_stride, line, 2, idx, w, taps, count); break;              \
        default: horizontal_##T##_n(out, out_stride, line, 1, idx, w, taps, count); break;             \
        }                                                                                              \
    }

/* mixed[j*n + p] = line[p*stride + j], j < count: n planes interleaved, n constant once inlined */
#define MIX(T)                                                                                         \
    static inline __attribute__((always_inline)) void mix_##T##_n(T *mixed, const T *line,             \
                                                                  Py_ssize_t stride, Py_ssize_t count, \
                                                                  int n)                               \
    {                                                                                                  \
        for (Py_ssize_t j = 0; j < count; j++)                                                         \
            for (int p = 0; p < n; p++)                                                                \
                mixed[j * n + p] = line[p * stride + j];                                               \
    }                                                                                                  \
    VECTOR_CLONES static void mix_##T(T *mixed, const T *line, Py_ssize_t stride, Py_ssize_t count,    \
                                      int n)                                                           \
    {                                                                                                  \
        switch (n) {                                                                                   \
        case 4: mix_##T##_n(mixed, line, stride, count, 4); break;                                     \
        case 3: mix_##T##_n(mixed, line, stride, count, 3); break;                                     \
        case 2: mix_##T##_n(mixed, line, stride, count, 2); break;                                     \
        default: mix_##T##_n(mixed, line, stride, count, 1); break;                                    \
        }                                                                                              \
    }

MIX(float)
MIX(double)
FLOAT_KERNELS(float, v4sf, load4)
FLOAT_KERNELS(double, v4df, load4d)

typedef struct {
    Py_buffer src, row_idx, row_w, col_idx, col_w, out;
} Buffers;

/* The end of a resampling call: its buffers released, then None (status 0), a MemoryError
 * (status 1) or the error already set (status -1). */
static PyObject *
finish_call(Buffers *b, int status)
{
    RELEASE_BUFFERS(&b->src, &b->row_idx, &b->row_w, &b->col_idx, &b->col_w, &b->out);
    if (status > 0)
        return PyErr_NoMemory();
    if (status < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Checks every index is inside [0, limit); *low and *high get the range they span. */
static int
check_indices(const int32_t *idx, Py_ssize_t n, Py_ssize_t limit, Py_ssize_t *low, Py_ssize_t *high)
{
    int32_t lo = INT32_MAX, hi = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= limit) {
            PyErr_SetString(PyExc_ValueError, "tap index outside the source");
            return -1;
        }
        lo = idx[i] < lo ? idx[i] : lo;
        hi = idx[i] > hi ? idx[i] : hi;
    }
    *low = lo;
    *high = (Py_ssize_t)hi + 1;
    return 0;
}

/* The taps against the buffers, before any read: tap counts of at least 1, the output's rows and
 * columns from the tap arrays (*rows, *cols), the sizes of the source (src_bytes) and of the output
 * (pixel_bytes a pixel), every index inside the source; *c0..*c1 the source columns a tap reads. */
static int
check_taps(Buffers *b, Py_ssize_t height, Py_ssize_t width, Py_ssize_t src_bytes, Py_ssize_t pixel_bytes,
           Py_ssize_t row_taps, Py_ssize_t col_taps, Py_ssize_t *rows, Py_ssize_t *cols, Py_ssize_t *c0,
           Py_ssize_t *c1)
{
    Py_ssize_t r0, r1;
    if (row_taps < 1 || col_taps < 1) {
        PyErr_SetString(PyExc_ValueError, "at least one tap a pixel");
        return -1;
    }
    *rows = b->row_idx.len / 4 / row_taps;
    *cols = b->col_idx.len / 4 / col_taps;
    if (b->src.len != src_bytes || b->row_idx.len != row_taps * *rows * 4 || b->row_w.len != b->row_idx.len
        || b->col_idx.len != col_taps * *cols * 4 || b->col_w.len != b->col_idx.len
        || b->out.len != *rows * *cols * pixel_bytes) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        return -1;
    }
    if (check_indices(b->row_idx.buf, *rows * row_taps, height, &r0, &r1) < 0)
        return -1;
    return check_indices(b->col_idx.buf, *cols * col_taps, width, c0, c1);
}

/* resample_u8(src, height, width, channels, row_idx, row_w, row_taps, col_idx, col_w, col_taps, out)
 * src: uint8 (height, width, channels); row_*: (out_rows, row_taps); col_*: (out_cols, col_taps);
 * out: uint8 (out_rows, out_cols, channels). Taps index the source's rows and columns. */
static PyObject *
resample_u8(PyObject *self, PyObject *args)
{
    Buffers b = {0};
    Py_ssize_t height, width, channels, row_taps, col_taps;
    if (!PyArg_ParseTuple(args, "y*nnny*y*ny*y*nw*", &b.src, &height, &width, &channels, &b.row_idx,
                          &b.row_w, &row_taps, &b.col_idx, &b.col_w, &col_taps, &b.out))
        return finish_call(&b, -1);
    if (channels < 1 || channels > 4 || height < 1 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "1 to 4 channels, a non-empty source");
        return finish_call(&b, -1);
    }
    Py_ssize_t rows, cols, c0, c1;
    if (check_taps(&b, height, width, height * width * channels, channels, row_taps, col_taps, &rows, &cols,
                   &c0, &c1) < 0)
        return finish_call(&b, -1);
    const uint8_t *src = b.src.buf;
    const int32_t *ri = b.row_idx.buf, *ci = b.col_idx.buf;
    const float *rw = b.row_w.buf, *cw = b.col_w.buf;
    uint8_t *out = b.out.buf;
    float *line = NULL;
    const uint8_t **taps = NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    line = calloc((size_t)((c1 - c0) * channels + 4), sizeof(float));
    taps = malloc(sizeof(*taps) * (size_t)row_taps);
    if (line == NULL || taps == NULL)
        failed = 1;
    else
        for (Py_ssize_t y = 0; y < rows; y++) {
            for (Py_ssize_t k = 0; k < row_taps; k++)
                taps[k] = src + ((Py_ssize_t)ri[y * row_taps + k] * width + c0) * channels;
            vertical_u8(line, taps, rw + y * row_taps, row_taps, (c1 - c0) * channels);
            uint8_t *o = out + y * cols * channels;
            /* indexed by source column */
            horizontal_u8(o, line - c0 * channels, ci, cw, col_taps, cols, (int)channels);
        }
    free(line);
    free(taps);
    Py_END_ALLOW_THREADS
    return finish_call(&b, failed);
}

/* One output row after another: the vertical pass into `line` (every plane, or only the columns
 * some tap reads), then each group of up to 4 planes interleaved into `mixed` and summed across. */
#define RESAMPLE_PLANES(T)                                                                             \
    static int resample_planes_##T(const float *src, Py_ssize_t planes, Py_ssize_t width,              \
                                   const int32_t *ri, const float *rw, Py_ssize_t row_taps,            \
                                   Py_ssize_t rows, const int32_t *ci, const float *cw,                \
                                   Py_ssize_t col_taps, Py_ssize_t cols, Py_ssize_t c0, Py_ssize_t c1, \
                                   float *out)                                                         \
    {                                                                                                  \
        T *line = malloc(sizeof(T) * (size_t)(planes * width));                                        \
        T *mixed = calloc((size_t)(4 * (c1 - c0) + 4), sizeof(T));                                     \
        const float **taps = malloc(sizeof(*taps) * (size_t)row_taps * 2);                             \
        if (line == NULL || mixed == NULL || taps == NULL) {                                           \
            free(line);                                                                                \
            free(mixed);                                                                               \
            free(taps);                                                                                \
            return -1;                                                                                 \
        }                                                                                              \
        const float **plane_taps = taps + row_taps;                                                    \
        for (Py_ssize_t y = 0; y < rows; y++) {                                                        \
            for (Py_ssize_t k = 0; k < row_taps; k++)                                                  \
                taps[k] = src + (Py_ssize_t)ri[y * row_taps + k] * planes * width;                     \
            if (c1 - c0 == width)                                                                      \
                vertical_##T(line, taps, rw + y * row_taps, row_taps, planes * width);                 \
            else                                                                                       \
                for (Py_ssize_t p = 0; p < planes; p++) {                                              \
                    for (Py_ssize_t k = 0; k < row_taps; k++)                                          \
                        plane_taps[k] = taps[k] + p * width + c0;                                      \
                    vertical_##T(line + p * width + c0, plane_taps, rw + y * row_taps, row_taps,       \
                                 c1 - c0);                                                             \
                }                                                                                      \
            for (Py_ssize_t p0 = 0; p0 < planes; p0 += 4) {                                            \
                int n = planes - p0 < 4 ? (int)(planes - p0) : 4;                                      \
                mix_##T(mixed, line + p0 * width + c0, width, c1 - c0, n);                             \
                horizontal_##T(out + (y * planes + p0) * cols, cols, mixed - c0 * n, n, ci, cw,        \
                               col_taps, cols);                                                        \
            }                                                                                          \
        }                                                                                              \
        free(line);                                                                                    \
        free(mixed);                                                                                   \
        free(taps);                                                                                    \
        return 0;                                                                                      \
    }

RESAMPLE_PLANES(float)
RESAMPLE_PLANES(double)

/* resample_f32(src, height, planes, width, row_idx, row_w, row_taps, col_idx, col_w, col_taps, out,
 *              precise)
 * src: float32 (height, planes, width); out: float32 (out_rows, planes, out_cols); precise: sums
 * in double. */
static PyObject *
resample_f32(PyObject *self, PyObject *args)
{
    Buffers b = {0};
    Py_ssize_t height, planes, width, row_taps, col_taps;
    int precise;
    if (!PyArg_ParseTuple(args, "y*nnny*y*ny*y*nw*p", &b.src, &height, &planes, &width, &b.row_idx,
                          &b.row_w, &row_taps, &b.col_idx, &b.col_w, &col_taps, &b.out, &precise))
        return finish_call(&b, -1);
    if (planes < 1 || height < 1 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "a non-empty source");
        return finish_call(&b, -1);
    }
    Py_ssize_t rows, cols, c0, c1;
    if (check_taps(&b, height, width, height * planes * width * 4, planes * 4, row_taps, col_taps, &rows,
                   &cols, &c0, &c1) < 0)
        return finish_call(&b, -1);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = (precise ? resample_planes_double : resample_planes_float)(
        b.src.buf, planes, width, b.row_idx.buf, b.row_w.buf, row_taps, rows, b.col_idx.buf,
        b.col_w.buf, col_taps, cols, c0, c1, b.out.buf);
    Py_END_ALLOW_THREADS
    return finish_call(&b, failed);
}

/* One row of finish_u8, band by band so that the compiler vectorises it (validity, division,
 * rounding, clipping, fill): bytes[c*width + x] the band values, good[x] the validity. */
VECTOR_CLONES static void
finish_row(uint8_t *bytes, uint8_t *good, const float *row, const float *coverage,
           const uint8_t *inside, float threshold, const uint8_t *fill, Py_ssize_t width,
           Py_ssize_t channels)
{
    if (coverage == NULL)
        for (Py_ssize_t x = 0; x < width; x++)
            good[x] = inside[x] != 0;
    else
        for (Py_ssize_t x = 0; x < width; x++)
            good[x] = (inside[x] != 0) & (coverage[x] >= threshold);
    for (Py_ssize_t c = 0; c < channels; c++) {
        const float *band = row + c * width;
        uint8_t *b = bytes + c * width, f = fill[c];
        for (Py_ssize_t x = 0; x < width; x++) {
            float v = coverage == NULL ? band[x] : band[x] / coverage[x];
            v = rintf(v);              /* half to even */
            v = v >= 0.0f ? v : 0.0f;  /* NaN too (0/0 where no tap was valid) */
            v = v <= 255.0f ? v : 255.0f;
            b[x] = good[x] ? (uint8_t)(int32_t)v : f;
        }
    }
}

/* out[x*C + c] = bytes[c*width + x]: planes to pixels, C constant once inlined */
static inline __attribute__((always_inline)) void
interleave_n(uint8_t *out, const uint8_t *bytes, Py_ssize_t width, Py_ssize_t channels)
{
    for (Py_ssize_t x = 0; x < width; x++)
        for (Py_ssize_t c = 0; c < channels; c++)
            out[x * channels + c] = bytes[c * width + x];
}

VECTOR_CLONES static void
interleave(uint8_t *out, const uint8_t *bytes, Py_ssize_t width, Py_ssize_t channels)
{
    switch (channels) {
    case 1: memcpy(out, bytes, (size_t)width); break;
    case 3: interleave_n(out, bytes, width, 3); break;
    case 4: interleave_n(out, bytes, width, 4); break;
    default: interleave_n(out, bytes, width, channels); break;
    }
}

/* finish_u8(planes, height, count, width, channels, has_mask, inside, threshold, fill, out, valid)
 * warp's last step for uint8 data, in one pass: planes float32 (height, count, width) hold the
 * premultiplied sums of `channels` bands, then (has_mask) the coverage; a pixel is valid when it
 * is `inside` (bool (height, width)) and its coverage reaches `threshold`; its bands are the sums
 * divided by the coverage, rounded half to even and clipped, else `fill` (channels bytes).
 * out: uint8 (height, width, channels); valid: bool (height, width). Same bytes as warp._finish. */
static PyObject *
finish_u8(PyObject *self, PyObject *args)
{
    Py_buffer planes = {0}, inside = {0}, fill = {0}, out = {0}, valid = {0};
    Py_ssize_t height, count, width, channels;
    int has_mask;
    float threshold;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnnpy*fy*w*w*", &planes, &height, &count, &width, &channels,
                          &has_mask, &inside, &threshold, &fill, &out, &valid))
        goto done;
    if (height < 0 || width < 0 || channels < 1 || channels + has_mask > count
        || planes.len != height * count * width * 4 || inside.len != height * width
        || fill.len != channels || out.len != height * width * channels || valid.len != height * width) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    const float *src = planes.buf;
    const uint8_t *in = inside.buf, *fl = fill.buf;
    uint8_t *o = out.buf, *ok = valid.buf;
    uint8_t *bytes = NULL;
    Py_BEGIN_ALLOW_THREADS
    bytes = malloc((size_t)(width * channels) + 1);
    if (bytes != NULL)
        for (Py_ssize_t y = 0; y < height; y++) {
            const float *row = src + y * count * width;
            finish_row(bytes, ok + y * width, row, has_mask ? row + channels * width : NULL,
                       in + y * width, threshold, fl, width, channels);
            interleave(o + y * width * channels, bytes, width, channels);
        }
    free(bytes);
    Py_END_ALLOW_THREADS
    if (bytes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&planes, &inside, &fill, &out, &valid);
    return result;
}

/* planes_row with the pixel step and band count constant once inlined: the strided byte loads
 * then vectorise (shuffles), where a variable step leaves one scalar load a sample */
static inline __attribute__((always_inline)) void
planes_row_n(float *out, Py_ssize_t width, const uint8_t *row, Py_ssize_t step, Py_ssize_t channels,
             const uint8_t *valid)
{
    for (Py_ssize_t c = 0; c < channels; c++) {
        float *plane = out + c * width;
        const uint8_t *band = row + c;
        if (valid == NULL)
            for (Py_ssize_t x = 0; x < width; x++)
                plane[x] = (float)band[x * step];
        else
            for (Py_ssize_t x = 0; x < width; x++) /* times 0 or 1: no branch, as numpy's multiply */
                plane[x] = (float)band[x * step] * (float)valid[x];
    }
    if (valid != NULL)
        for (Py_ssize_t x = 0; x < width; x++)
            out[channels * width + x] = (float)valid[x];
}

/* One row of planes_u8: `channels` bands of uint8 pixels `step` bytes apart into float planes
 * (premultiplied by the 0/1 validity when given), then the validity plane. */
VECTOR_CLONES static void
planes_row(float *out, Py_ssize_t width, const uint8_t *row, Py_ssize_t step, Py_ssize_t channels,
           const uint8_t *valid)
{
    if (step == 4 && channels == 3)
        planes_row_n(out, width, row, 4, 3, valid);
    else if (step == 4 && channels == 4)
        planes_row_n(out, width, row, 4, 4, valid);
    else if (step == 3 && channels == 3)
        planes_row_n(out, width, row, 3, 3, valid);
    else if (step == 1 && channels == 1)
        planes_row_n(out, width, row, 1, 1, valid);
    else
        planes_row_n(out, width, row, step, channels, valid);
}

/* planes_u8(base, offset, row_stride, step, height, width, channels, valid, out)
 * warp's planes of a uint8 window: pixel (y, x) band c at base[offset + y*row_stride + x*step + c]
 * (a crop of a mosaic, unmoved); valid: bool (height, width), or empty when every pixel is; out:
 * float32 (height, channels (+1 with valid), width). */
static PyObject *
planes_u8(PyObject *self, PyObject *args)
{
    Py_buffer base = {0}, valid = {0}, out = {0};
    Py_ssize_t offset, row_stride, step, height, width, channels;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnnnny*w*", &base, &offset, &row_stride, &step, &height, &width,
                          &channels, &valid, &out))
        goto done;
    int has_valid = valid.len > 0;
    Py_ssize_t count = channels + has_valid;
    if (height < 1 || width < 1 || channels < 1 || step < channels || row_stride < width * step
        || offset < 0 || offset + (height - 1) * row_stride + (width - 1) * step + channels > base.len
        || (has_valid && valid.len != height * width) || out.len != height * count * width * 4) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    const uint8_t *in = (const uint8_t *)base.buf + offset, *ok = valid.buf;
    float *o = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t y = 0; y < height; y++)
        planes_row(o + y * count * width, width, in + y * row_stride, step, channels,
                   has_valid ? ok + y * width : NULL);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&base, &valid, &out);
    return result;
}

/* Source rows of a warp_u8 window as float planes, each converted once: a row serves the few
 * output rows whose taps reach it. `slots` rows of `size` floats; a row missing is converted into
 * a slot none of the current output row's taps holds (there are twice as many slots as taps). */
typedef struct {
    float *rows;
    Py_ssize_t *tags, slots, size, next;
} RowCache;

static const float *
cached_row(RowCache *cache, Py_ssize_t row, const int32_t *needed, Py_ssize_t taps, const uint8_t *in,
           Py_ssize_t row_stride, Py_ssize_t step, Py_ssize_t span, Py_ssize_t channels, const uint8_t *valid,
           Py_ssize_t valid_stride)
{
    for (Py_ssize_t s = 0; s < cache->slots; s++)
        if (cache->tags[s] == row)
            return cache->rows + s * cache->size;
    for (;;) {
        Py_ssize_t s = cache->next;
        cache->next = (s + 1) % cache->slots;
        Py_ssize_t k = 0;
        while (k < taps && needed[k] != cache->tags[s])
            k++;
        if (k < taps)
            continue; /* held for this output row */
        cache->tags[s] = row;
        float *out = cache->rows + s * cache->size;
        planes_row(out, span, in + row * row_stride, step, channels, valid == NULL ? NULL : valid + row * valid_stride);
        return out;
    }
}

/* warp_u8(base, offset, row_stride, step, height, width, channels, valid, row_idx, row_w, row_taps,
 *         col_idx, col_w, col_taps, inside, threshold, fill, out, out_valid)
 * warp's same-CRS resampling of a uint8 window, planes_u8 -> resample_f32 -> finish_u8 in one pass
 * and the same bytes, without the float planes of the whole window and of the whole map: each
 * source row becomes float planes once, in a small cache, each output row is summed in a line and
 * finished at once. The window and `valid` as in planes_u8; taps as in resample_f32, relative to
 * the window; inside: bool (out_rows, out_cols); out: uint8 (out_rows, out_cols, channels);
 * out_valid: bool (out_rows, out_cols). */
static PyObject *
warp_u8(PyObject *self, PyObject *args)
{
    Buffers b = {0};
    Py_buffer valid = {0}, inside = {0}, fill = {0}, out_valid = {0};
    Py_ssize_t offset, row_stride, step, height, width, channels, row_taps, col_taps;
    float threshold;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnnnny*y*y*ny*y*ny*fy*w*w*", &b.src, &offset, &row_stride, &step, &height,
                          &width, &channels, &valid, &b.row_idx, &b.row_w, &row_taps, &b.col_idx, &b.col_w,
                          &col_taps, &inside, &threshold, &fill, &b.out, &out_valid))
        goto done;
    int has_valid = valid.len > 0;
    Py_ssize_t count = channels + has_valid, rows, cols, c0, c1;
    if (height < 1 || width < 1 || channels < 1 || channels > 4 || step < channels || row_stride < width * step
        || offset < 0 || offset + (height - 1) * row_stride + (width - 1) * step + channels > b.src.len
        || (has_valid && valid.len != height * width) || fill.len != channels) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    if (check_taps(&b, height, width, b.src.len, channels, row_taps, col_taps, &rows, &cols, &c0, &c1) < 0)
        goto done;
    if (inside.len != rows * cols || out_valid.len != rows * cols) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto done;
    }
    const uint8_t *in = (const uint8_t *)b.src.buf + offset + c0 * step, *ok = has_valid ? valid.buf : NULL;
    const int32_t *ri = b.row_idx.buf, *ci = b.col_idx.buf;
    const float *rw = b.row_w.buf, *cw = b.col_w.buf;
    const uint8_t *fl = fill.buf, *inner = inside.buf;
    uint8_t *o = b.out.buf, *good = out_valid.buf;
    Py_ssize_t span = c1 - c0; /* the source columns some tap reads */
    RowCache cache = {NULL, NULL, 2 * row_taps, count * span, 0};
    float *line = NULL, *mixed = NULL, *sums = NULL;
    const float **taps = NULL;
    uint8_t *bytes = NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    cache.rows = malloc(sizeof(float) * (size_t)(cache.slots * cache.size));
    cache.tags = malloc(sizeof(Py_ssize_t) * (size_t)cache.slots);
    line = malloc(sizeof(float) * (size_t)(count * span));
    mixed = calloc((size_t)(4 * span + 4), sizeof(float));
    sums = malloc(sizeof(float) * (size_t)(count * cols));
    taps = malloc(sizeof(*taps) * (size_t)row_taps);
    bytes = malloc((size_t)(channels * cols) + 1);
    if (cache.rows == NULL || cache.tags == NULL || line == NULL || mixed == NULL || sums == NULL || taps == NULL
        || bytes == NULL)
        failed = 1;
    else {
        for (Py_ssize_t s = 0; s < cache.slots; s++)
            cache.tags[s] = -1;
        for (Py_ssize_t y = 0; y < rows; y++) {
            const int32_t *needed = ri + y * row_taps;
            for (Py_ssize_t k = 0; k < row_taps; k++)
                taps[k] = cached_row(&cache, needed[k], needed, row_taps, in, row_stride, step, span, channels,
                                     ok == NULL ? NULL : ok + c0, width);
            vertical_float(line, taps, rw + y * row_taps, row_taps, count * span);
            for (Py_ssize_t p0 = 0; p0 < count; p0 += 4) {
                int n = count - p0 < 4 ? (int)(count - p0) : 4;
                mix_float(mixed, line + p0 * span, span, span, n);
                horizontal_float(sums + p0 * cols, cols, mixed - c0 * n, n, ci, cw, col_taps, cols);
            }
            finish_row(bytes, good + y * cols, sums, has_valid ? sums + channels * cols : NULL, inner + y * cols,
                       threshold, fl, cols, channels);
            interleave(o + y * cols * channels, bytes, cols, channels);
        }
    }
    free(cache.rows);
    free(cache.tags);
    free(line);
    free(mixed);
    free(sums);
    free(taps);
    free(bytes);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    RELEASE_BUFFERS(&b.src, &b.row_idx, &b.row_w, &b.col_idx, &b.col_w, &b.out, &valid, &inside, &fill, &out_valid);
    return result;
}

static PyMethodDef methods[] = {
    {"resample_u8", resample_u8, METH_VARARGS, "Separable resampling of an interleaved uint8 picture."},
    {"resample_f32", resample_f32, METH_VARARGS, "Separable resampling of row-interleaved float32 planes."},
    {"planes_u8", planes_u8, METH_VARARGS, "warp's premultiplied float planes of a uint8 window."},
    {"warp_u8", warp_u8, METH_VARARGS, "planes_u8, resample_f32 and finish_u8 of a uint8 window in one pass."},
    {"finish_u8", finish_u8, METH_VARARGS, "warp's normalisation, validity and rounding to uint8, fused."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_separable", "Separable resampling kernels (see _separable.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__separable(void)
{
    return PyModule_Create(&module);
}
