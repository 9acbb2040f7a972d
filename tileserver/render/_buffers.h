/* What the compiled kernels (render/_*.c) share: the AVX2 clone of their vectorised loops, and the
 * release of the buffers a call borrowed from its numpy arguments. */
#ifndef TILESERVER_BUFFERS_H
#define TILESERVER_BUFFERS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* An AVX2 clone of a loop beside the baseline one, picked at load time from the CPU (GCC, x86-64);
 * AVX2 has no FMA, so the clones keep every rounding of the baseline code. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline void
release_buffers(Py_buffer *const *all, size_t count)
{
    for (size_t i = 0; i < count; i++)
        if (all[i]->obj != NULL)
            PyBuffer_Release(all[i]);
}

/* RELEASE_BUFFERS(&a, &b, ...): each buffer PyArg_ParseTuple filled (an unfilled one is skipped) */
#define RELEASE_BUFFERS(...)                                                                       \
    do {                                                                                           \
        Py_buffer *const all_[] = {__VA_ARGS__};                                                   \
        release_buffers(all_, sizeof(all_) / sizeof(all_[0]));                                     \
    } while (0)

#endif
