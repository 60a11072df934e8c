// Per-image deformation of Ciresan et al. (2010): affine (rotation, horizontal shear, scaling)
// plus Simard's elastic field, applied by ONE bilinear resampling. Reference: gpumlp/deform.py
// (deform_images_ref), which documents the conventions; this file follows it operation for
// operation. Images are (n, 841) = 29 x 29 row-major floats, background -1; x = column, y = row.
//
// Where a multiply feeds an add, __fmul_rn / __fadd_rn keep NVRTC from contracting the pair into
// an fma (it does by default), so every such step rounds exactly as numpy's float32 does. The
// parameters therefore match the reference bit for bit; the images differ only through
// sinf/cosf/tanf versus numpy's float32 versions (the smoothing adds its taps in the reference's
// order, ascending k from 0.0f: gpumlp/deform.py smooth_lines).
#include "philox.cuh"

#define SIDE 29
#define PIXELS 841                  // 29 * 29
#define FIELD_VALUES 1682           // x and y displacement, 841 each
#define FIELD_BLOCKS 421            // Philox blocks 1 .. 421 give 1684 >= 1682 words
#define CENTRE 14.0f
#define DEG2RAD 0x1.1df46ap-6f      // float32(pi / 180), the reference's DEG2RAD, spelt exactly

// One value of a separable Gaussian pass along a line of a 29x29 field: `centre` points at the
// value, `stride` is 1 along a row or SIDE along a column, `pos` is its index on that line. Zero
// boundary: taps that fall outside the image are skipped; ascending k, as the reference documents.
__device__ __forceinline__ float smooth_along(const float* centre, int stride, int pos,
                                              const float* __restrict__ taps, int radius)
{
    const int lo = max(-radius, -pos);
    const int hi = min(radius, SIDE - 1 - pos);
    float sum = 0.0f;
    for (int k = lo; k <= hi; ++k)
        sum = __fadd_rn(sum, __fmul_rn(taps[k + radius], centre[k * stride]));
    return sum;
}

// deform_images: one block per image (grid-stride over images), any blockDim.x (256 is typical).
//   images  (n_images, 841) float   source digits
//   labels  (n_images,) int         selects beta_1_7 for the digits 1 and 7
//   indices (n_images,) int         dataset index of each image: the Philox counter, so a subset
//                                   deforms exactly as it would inside the full set
//   out     (n_images, 841) float   deformed digits, in [-1, 1]
//   params  (n_images, 4) float     [rotation deg, shear deg, scale_x, scale_y]
//   taps    (2 radius + 1,) float   Gaussian taps from gaussian_taps(sigma) on the host
//   gamma_frac = float32(gamma / 100), divided on the host so both paths use the same value
// Threads of a block: stage the image and draw the raw field into shared memory (one Philox call
// per thread per 4 field values), thread 0 draws the 4 parameters and builds M; then each thread
// smooths some field values horizontally, then vertically (a barrier between passes, because a
// pass reads values other threads wrote), then resamples some output pixels.
extern "C" __global__ void deform_images(const float* __restrict__ images,
                                         const int* __restrict__ labels,
                                         const int* __restrict__ indices,
                                         float* __restrict__ out,
                                         float* __restrict__ params,
                                         const float* __restrict__ taps,
                                         int n_images, int radius,
                                         unsigned seed, unsigned epoch,
                                         float beta, float beta_1_7, float gamma_frac, float alpha)
{
    __shared__ float s_img[PIXELS];                // the source digit
    __shared__ float s_field[4 * FIELD_BLOCKS];    // raw field, later the final alpha-scaled field
    __shared__ float s_tmp[FIELD_VALUES];          // after the horizontal pass
    __shared__ float s_M[4];                       // M00, M01, M10, M11

    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    // Uniform over the block, so the branches below never split a barrier.
    const bool elastic = alpha != 0.0f;

    for (int img = blockIdx.x; img < n_images; img += gridDim.x) {
        const unsigned index = (unsigned)indices[img];
        const float* src = images + (size_t)img * PIXELS;

        for (int p = tid; p < PIXELS; p += nthreads)
            s_img[p] = src[p];

        if (elastic) {
            // Word k = 4 (block - 1) + w of the field stream: k < 841 is x at pixel k, else y.
            for (int j = tid; j < FIELD_BLOCKS; j += nthreads) {
                unsigned c0 = index, c1 = (unsigned)(j + 1), c2 = 0u, c3 = 0u;
                philox4x32_10(c0, c1, c2, c3, seed, epoch);
                s_field[4 * j + 0] = philox_uniform_pm1(c0);
                s_field[4 * j + 1] = philox_uniform_pm1(c1);
                s_field[4 * j + 2] = philox_uniform_pm1(c2);
                s_field[4 * j + 3] = philox_uniform_pm1(c3);
            }
        } else {
            // alpha = 0: no elastic part, and no draws (the identity config must be exact)
            for (int k = tid; k < FIELD_VALUES; k += nthreads)
                s_field[k] = 0.0f;
        }

        if (tid == 0) {
            unsigned c0 = index, c1 = 0u, c2 = 0u, c3 = 0u;   // block 0: the affine draws
            philox4x32_10(c0, c1, c2, c3, seed, epoch);
            const int label = labels[img];
            const float b = (label == 1 || label == 7) ? beta_1_7 : beta;
            const float rotation = b * philox_uniform_pm1(c0);
            const float shear = b * philox_uniform_pm1(c1);
            const float scale_x = __fadd_rn(1.0f, __fmul_rn(gamma_frac, philox_uniform_pm1(c2)));
            const float scale_y = __fadd_rn(1.0f, __fmul_rn(gamma_frac, philox_uniform_pm1(c3)));
            float* p = params + (size_t)img * 4;
            p[0] = rotation;
            p[1] = shear;
            p[2] = scale_x;
            p[3] = scale_y;
            // M = R(rotation) Sh(shear) S(scale_x, scale_y), the output-to-source map
            const float theta = rotation * DEG2RAD;
            const float c = cosf(theta);
            const float s = sinf(theta);
            const float t = tanf(shear * DEG2RAD);
            s_M[0] = c * scale_x;
            s_M[1] = __fmul_rn(__fadd_rn(__fmul_rn(c, t), -s), scale_y);
            s_M[2] = s * scale_x;
            s_M[3] = __fmul_rn(__fadd_rn(__fmul_rn(s, t), c), scale_y);
        }
        __syncthreads();

        if (elastic) {
            // Horizontal pass over both fields (e < 841: x field, else y field).
            for (int e = tid; e < FIELD_VALUES; e += nthreads) {
                const int pix = e < PIXELS ? e : e - PIXELS;
                s_tmp[e] = smooth_along(s_field + e, 1, pix % SIDE, taps, radius);
            }
        }
        __syncthreads();

        if (elastic) {
            // Vertical pass, s_tmp -> s_field (nobody reads s_field now), times alpha.
            for (int e = tid; e < FIELD_VALUES; e += nthreads) {
                const int pix = e < PIXELS ? e : e - PIXELS;
                s_field[e] = __fmul_rn(alpha, smooth_along(s_tmp + e, SIDE, pix / SIDE, taps, radius));
            }
        }
        __syncthreads();

        // Resampling: each thread some output pixels p; source = c + M (p - c) + field(p).
        const float M00 = s_M[0], M01 = s_M[1], M10 = s_M[2], M11 = s_M[3];
        float* dst = out + (size_t)img * PIXELS;
        for (int p = tid; p < PIXELS; p += nthreads) {
            const int y = p / SIDE;
            const int x = p - y * SIDE;
            const float dx = (float)(x - 14);
            const float dy = (float)(y - 14);
            const float sx = __fadd_rn(__fadd_rn(CENTRE, __fadd_rn(__fmul_rn(M00, dx), __fmul_rn(M01, dy))),
                                       s_field[p]);
            const float sy = __fadd_rn(__fadd_rn(CENTRE, __fadd_rn(__fmul_rn(M10, dx), __fmul_rn(M11, dy))),
                                       s_field[PIXELS + p]);
            const float fx0 = floorf(sx);
            const float fy0 = floorf(sy);
            const float ax = sx - fx0;   // exact: the fraction bits
            const float ay = sy - fy0;
            // Clamp before converting to int: a far-away corner becomes -2 or 29, whose 2x2
            // neighbourhood is background just as the true one, and the weights are unchanged.
            const int x0 = (int)fminf(fmaxf(fx0, -2.0f), (float)SIDE);
            const int y0 = (int)fminf(fmaxf(fy0, -2.0f), (float)SIDE);
            const bool inx0 = x0 >= 0 && x0 < SIDE, inx1 = x0 + 1 >= 0 && x0 + 1 < SIDE;
            const bool iny0 = y0 >= 0 && y0 < SIDE, iny1 = y0 + 1 >= 0 && y0 + 1 < SIDE;
            const float i00 = (iny0 && inx0) ? s_img[y0 * SIDE + x0] : -1.0f;
            const float i01 = (iny0 && inx1) ? s_img[y0 * SIDE + x0 + 1] : -1.0f;
            const float i10 = (iny1 && inx0) ? s_img[(y0 + 1) * SIDE + x0] : -1.0f;
            const float i11 = (iny1 && inx1) ? s_img[(y0 + 1) * SIDE + x0 + 1] : -1.0f;
            const float top = __fadd_rn(i00, __fmul_rn(ax, i01 - i00));
            const float bottom = __fadd_rn(i10, __fmul_rn(ax, i11 - i10));
            const float value = __fadd_rn(top, __fmul_rn(ay, bottom - top));
            // float32 interpolation can overshoot [-1, 1] by an ulp
            dst[p] = fminf(fmaxf(value, -1.0f), 1.0f);
        }
        // The next image overwrites s_img, s_field and s_M.
        __syncthreads();
    }
}

// philox_fill: the raw generator output, so tests compare it with the reference bit for bit.
// One thread per (image i, block b), grid-stride:
//   indices (n,) int; out (n, n_blocks * 4) unsigned, out[i, 4 b + w] = word w of
//   Philox4x32-10(counter (indices[i], b, 0, 0), key (seed, epoch)).
extern "C" __global__ void philox_fill(const int* __restrict__ indices, unsigned* __restrict__ out,
                                       int n, int n_blocks, unsigned seed, unsigned epoch)
{
    const long long total = (long long)n * n_blocks;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(t / n_blocks);
        const int b = (int)(t - (long long)i * n_blocks);
        unsigned c0 = (unsigned)indices[i], c1 = (unsigned)b, c2 = 0u, c3 = 0u;
        philox4x32_10(c0, c1, c2, c3, seed, epoch);
        unsigned* o = out + t * 4;
        o[0] = c0;
        o[1] = c1;
        o[2] = c2;
        o[3] = c3;
    }
}
