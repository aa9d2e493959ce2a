//! Safe wrapper over MLX's custom GPU kernels (`fast::cuda_kernel` / `fast::metal_kernel`
//! through mlx-c's raw bindings): a kernel body string plus inputs, template arguments, grid and
//! output shapes. The same call shape serves both backends; only the mlx-c functions differ.
//! Each kernel's mlx-c object is built on first use and cached (launch constants are not rebuilt
//! per call).
use std::ffi::CString;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use mlx_rs::{Array, Dtype, Stream};

use crate::mlx_env::Backend;

pub enum TemplateArg {
    Dtype(Dtype),
    Int(i32),
    Bool(bool),
}

pub struct GpuKernel {
    pub name: &'static str,
    pub inputs: &'static [&'static str],
    pub outputs: &'static [&'static str],
    pub source: &'static str,
    pub header: &'static str,
}

fn strings(names: &[&str]) -> Result<mlx_sys::mlx_vector_string> {
    let v = unsafe { mlx_sys::mlx_vector_string_new() };
    for n in names {
        let c = CString::new(*n)?;
        unsafe { mlx_sys::mlx_vector_string_append_value(v, c.as_ptr()) };
    }
    Ok(v)
}

/// An mlx-c kernel object, built once per (kernel, backend) from the kernel's static name,
/// input/output names, body and header, and kept for the process (as a Python caller keeps the
/// result of `mx.fast.cuda_kernel(...)`): only the per-call template arguments, grid and output
/// shapes are set at each launch. MLX caches the compiled library by the instantiated name.
#[derive(Clone, Copy)]
enum Handle {
    Cuda(mlx_sys::mlx_fast_cuda_kernel),
    Metal(mlx_sys::mlx_fast_metal_kernel),
}

// The handles are opaque pointers to immutable kernel descriptions, never freed.
unsafe impl Send for Handle {}

static HANDLES: Mutex<Vec<(usize, Backend, Handle)>> = Mutex::new(Vec::new());

impl GpuKernel {
    fn handle(&'static self, backend: Backend) -> Result<Handle> {
        let key = self as *const GpuKernel as usize;
        let mut cache = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, h)) = cache.iter().find(|(k, b, _)| *k == key && *b == backend) {
            return Ok(*h);
        }
        let name = CString::new(self.name)?;
        let source = CString::new(self.source)?;
        let header = CString::new(self.header)?;
        let in_names = strings(self.inputs)?;
        let out_names = strings(self.outputs)?;
        let h = unsafe {
            match backend {
                Backend::Cuda => Handle::Cuda(mlx_sys::mlx_fast_cuda_kernel_new(
                    name.as_ptr(),
                    in_names,
                    out_names,
                    source.as_ptr(),
                    header.as_ptr(),
                    true,
                    0,
                )),
                Backend::Metal => Handle::Metal(mlx_sys::mlx_fast_metal_kernel_new(
                    name.as_ptr(),
                    in_names,
                    out_names,
                    source.as_ptr(),
                    header.as_ptr(),
                    true,
                    false,
                )),
                Backend::Cpu => {
                    mlx_sys::mlx_vector_string_free(in_names);
                    mlx_sys::mlx_vector_string_free(out_names);
                    return Err(anyhow!("kernel `{}`: no GPU on the CPU backend", self.name));
                }
            }
        };
        // mlx-c copies the strings into the kernel object.
        unsafe {
            mlx_sys::mlx_vector_string_free(in_names);
            mlx_sys::mlx_vector_string_free(out_names);
        }
        let built = match h {
            Handle::Cuda(k) => !k.ctx.is_null(),
            Handle::Metal(k) => !k.ctx.is_null(),
        };
        if !built {
            return Err(anyhow!(
                "{} kernel `{}` could not be created: {}",
                backend.name(),
                self.name,
                crate::mlx_env::take_last_error()
            ));
        }
        cache.push((key, backend, h));
        Ok(h)
    }

    /// Runs the kernel on the current stream; returns its outputs.
    pub fn apply(
        &'static self,
        backend: Backend,
        inputs: &[&Array],
        template: &[(&str, TemplateArg)],
        grid: (i32, i32, i32),
        threads: (i32, i32, i32),
        outputs: &[(&[i32], Dtype)],
    ) -> Result<Vec<Array>> {
        let handle = self.handle(backend)?;
        let tnames: Vec<CString> = template.iter().map(|(n, _)| CString::new(*n)).collect::<Result<_, _>>()?;
        let ins = unsafe { mlx_sys::mlx_vector_array_new() };
        for a in inputs {
            unsafe { mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr()) };
        }
        let mut res = unsafe { mlx_sys::mlx_vector_array_new() };
        let stream = Stream::thread_local_or_default();
        // The CUDA and Metal entry points of mlx-c have the same shape; only the names differ.
        macro_rules! launch {
            ($k:ident, $cfg_new:ident, $cfg_free:ident, $out:ident, $grid:ident, $group:ident,
             $t_dtype:ident, $t_int:ident, $t_bool:ident, $apply:ident) => {{
                let cfg = mlx_sys::$cfg_new();
                for (shape, dt) in outputs {
                    mlx_sys::$out(cfg, shape.as_ptr(), shape.len(), (*dt).into());
                }
                mlx_sys::$grid(cfg, grid.0, grid.1, grid.2);
                mlx_sys::$group(cfg, threads.0, threads.1, threads.2);
                for ((_, arg), n) in template.iter().zip(&tnames) {
                    match arg {
                        TemplateArg::Dtype(d) => mlx_sys::$t_dtype(cfg, n.as_ptr(), (*d).into()),
                        TemplateArg::Int(i) => mlx_sys::$t_int(cfg, n.as_ptr(), *i),
                        TemplateArg::Bool(b) => mlx_sys::$t_bool(cfg, n.as_ptr(), *b),
                    };
                }
                let st = mlx_sys::$apply(&mut res, $k, ins, cfg, stream.as_ptr());
                mlx_sys::$cfg_free(cfg);
                st
            }};
        }
        let status = unsafe {
            match handle {
                Handle::Cuda(k) => launch!(
                    k,
                    mlx_fast_cuda_kernel_config_new,
                    mlx_fast_cuda_kernel_config_free,
                    mlx_fast_cuda_kernel_config_add_output_arg,
                    mlx_fast_cuda_kernel_config_set_grid,
                    mlx_fast_cuda_kernel_config_set_thread_group,
                    mlx_fast_cuda_kernel_config_add_template_arg_dtype,
                    mlx_fast_cuda_kernel_config_add_template_arg_int,
                    mlx_fast_cuda_kernel_config_add_template_arg_bool,
                    mlx_fast_cuda_kernel_apply
                ),
                Handle::Metal(k) => launch!(
                    k,
                    mlx_fast_metal_kernel_config_new,
                    mlx_fast_metal_kernel_config_free,
                    mlx_fast_metal_kernel_config_add_output_arg,
                    mlx_fast_metal_kernel_config_set_grid,
                    mlx_fast_metal_kernel_config_set_thread_group,
                    mlx_fast_metal_kernel_config_add_template_arg_dtype,
                    mlx_fast_metal_kernel_config_add_template_arg_int,
                    mlx_fast_metal_kernel_config_add_template_arg_bool,
                    mlx_fast_metal_kernel_apply
                ),
            }
        };
        unsafe { mlx_sys::mlx_vector_array_free(ins) };
        if status != 0 {
            unsafe { mlx_sys::mlx_vector_array_free(res) };
            return Err(anyhow!(
                "{} kernel `{}` failed: {}",
                backend.name(),
                self.name,
                crate::mlx_env::take_last_error()
            ));
        }
        let n = unsafe { mlx_sys::mlx_vector_array_size(res) };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut a = unsafe { mlx_sys::mlx_array_new() };
            unsafe { mlx_sys::mlx_vector_array_get(&mut a, res, i) };
            out.push(unsafe { Array::from_ptr(a) });
        }
        unsafe { mlx_sys::mlx_vector_array_free(res) };
        Ok(out)
    }
}

/// The CUDA or Metal body of a kernel, for a GPU backend.
pub fn pick(backend: Backend, cuda: &'static GpuKernel, metal: &'static GpuKernel) -> &'static GpuKernel {
    if backend == Backend::Cuda {
        cuda
    } else {
        metal
    }
}
