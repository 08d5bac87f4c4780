//! Matmuls of `CudaBackend`: f32/f16/bf16 weights through cuBLAS (activations cast to the
//! weight's 16-bit type, f32 accumulate and output), GGML blocks through our GEMV for up to
//! `GEMV_MAX_ROWS` rows (`gemv_plan` picks the kernel), else dequantized to f16 scratch for a
//! cuBLAS GEMM.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::PushKernelArg;

use super::backend::{
    elementwise, grid1, grow, launch, quant_suffix, CudaBackend, CudaLinear, CudaTensor,
    CudaVector, Scratch, GEMV_MAX_ROWS,
};
use super::context::{kerr, ptr};
use crate::kernels::dtype::WeightDType;
use crate::kernels::KernelError;

impl CudaBackend {
    pub(crate) fn matmul_impl(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        bias: Option<&CudaVector>,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        let (m, k, n_total) = (x.rows, w.cols, w.rows);
        if x.cols != k {
            return Err(KernelError::Invalid(format!(
                "matmul: x has {} cols, W {k}",
                x.cols
            )));
        }
        out.ensure(gpu, m, n_total)?;
        if m == 0 {
            return Ok(());
        }
        let xp = x.ptr(gpu)?;
        let op = out.ptr(gpu)?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let mut cast_to: Option<WeightDType> = None;
        for part in &w.parts {
            let wp = ptr(&part.data, &gpu.stream);
            let n = part.rows;
            let y = op + (part.offset * 4) as u64;
            match part.dtype {
                WeightDType::F32 => self.gemm(GemmArgs {
                    m,
                    n,
                    k,
                    n_total,
                    w: wp,
                    x: xp,
                    y,
                    dtype: WeightDType::F32,
                })?,
                WeightDType::F16 | WeightDType::BF16 => {
                    let xh = self.cast_acts(&mut scratch, xp, m * k, part.dtype, &mut cast_to)?;
                    self.gemm(GemmArgs {
                        m,
                        n,
                        k,
                        n_total,
                        w: wp,
                        x: xh,
                        y,
                        dtype: part.dtype,
                    })?;
                }
                q if m <= GEMV_MAX_ROWS => {
                    let plan = super::gemv_plan::gemv_launch(q, n, k);
                    let kernel = if plan.vec16 { "gemv16" } else { "gemv" };
                    let name = format!("{kernel}_{}", quant_suffix(q)?);
                    let row_bytes = part.row_stride as u64;
                    let (mi, ni, ki, ld, off) = (
                        m as i32,
                        n as i32,
                        k as i32,
                        n_total as i32,
                        part.offset as i32,
                    );
                    launch!(
                        gpu,
                        &name,
                        grid1(plan.num_ctas, 128),
                        &wp,
                        &xp,
                        &op,
                        &mi,
                        &ni,
                        &ki,
                        &ld,
                        &off,
                        &row_bytes
                    )?;
                }
                q => {
                    let wh = grow(gpu, &mut scratch.weight, n * k)?;
                    let name = format!("dequantize_{}_f16", quant_suffix(q)?);
                    let row_bytes = part.row_stride as u64;
                    let (ni, ki) = (n as i32, k as i32);
                    launch!(
                        gpu,
                        &name,
                        elementwise(n * k / 32),
                        &wp,
                        &wh,
                        &ni,
                        &ki,
                        &row_bytes
                    )?;
                    let xh =
                        self.cast_acts(&mut scratch, xp, m * k, WeightDType::F16, &mut cast_to)?;
                    self.gemm(GemmArgs {
                        m,
                        n,
                        k,
                        n_total,
                        w: wh,
                        x: xh,
                        y,
                        dtype: WeightDType::F16,
                    })?;
                }
            }
        }
        if let Some(b) = bias {
            let (r, c) = (m as i32, n_total as i32);
            let bp = ptr(&b.data, &gpu.stream);
            launch!(
                gpu,
                "add_bias_f32",
                elementwise(m * n_total),
                &op,
                &bp,
                &r,
                &c
            )?;
        }
        Ok(())
    }

    /// `x` cast to the 16-bit `dtype` in scratch, reusing the last cast of this call.
    fn cast_acts(
        &self,
        scratch: &mut Scratch,
        xp: u64,
        len: usize,
        dtype: WeightDType,
        done: &mut Option<WeightDType>,
    ) -> Result<u64, KernelError> {
        let gpu = &self.gpu;
        let hp = grow(gpu, &mut scratch.half, len)?;
        if *done != Some(dtype) {
            let name = if dtype == WeightDType::BF16 {
                "cast_f32_to_bf16"
            } else {
                "cast_f32_to_f16"
            };
            let n = len as u64;
            launch!(gpu, name, elementwise(len), &xp, &n, &hp)?;
            *done = Some(dtype);
        }
        Ok(hp)
    }

    /// Row-major `y[m, n] (ld n_total) = x[m, k] · W[n, k]ᵀ`, as column-major
    /// `yᵀ = W · xᵀ`: cuBLAS `op(A) = Aᵀ` with A = W (k × n, ld k), B = x (k × m, ld k).
    fn gemm(&self, a: GemmArgs) -> Result<(), KernelError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ty = match a.dtype {
            WeightDType::F32 => cudaDataType::CUDA_R_32F,
            WeightDType::F16 => cudaDataType::CUDA_R_16F,
            _ => cudaDataType::CUDA_R_16BF,
        };
        // SAFETY: the pointers are live device buffers of at least n·k, m·k and m·n_total
        // elements of the stated types; cuBLAS runs on the backend's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.gpu.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                a.n as i32,
                a.m as i32,
                a.k as i32,
                &alpha as *const f32 as *const _,
                a.w as *const _,
                ty,
                a.k as i32,
                a.x as *const _,
                ty,
                a.k as i32,
                &beta as *const f32 as *const _,
                a.y as *mut _,
                cudaDataType::CUDA_R_32F,
                a.n_total as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(kerr)
    }
}

struct GemmArgs {
    m: usize,
    n: usize,
    k: usize,
    n_total: usize,
    w: u64,
    x: u64,
    y: u64,
    dtype: WeightDType,
}
