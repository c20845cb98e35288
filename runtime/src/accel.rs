//! Where a model runs: `--backend auto|cpu|wgpu|vulkan|metal|cuda`.
//!
//! * `cpu`: ember's own SIMD kernels on the mapped file.
//! * `auto`: an NVIDIA GPU through CUDA when this ember has the `cuda` feature and the machine
//!   has the driver; else the best **hardware** GPU adapter wgpu finds (discrete, then
//!   integrated, then virtual); otherwise the CPU, saying why at each step.
//! * `cuda`: the same CubeCL kernels through burn's CUDA runtime (the driver and NVRTC are
//!   loaded at run time; nothing of the toolkit at build time). Where it cannot start (no
//!   `cuda` feature, no driver, no NVRTC) it is an error, not a fallback.
//! * `wgpu`: the best adapter of any kind, software ones included (lavapipe, llvmpipe), which is
//!   how CI checks the GPU path on a machine without a GPU.
//! * `vulkan`, `metal`: as `wgpu`, limited to adapters of that API.
//!
//! On every API ember's kernels are compiled to WGSL: burn's direct SPIR-V path (`burn/vulkan`)
//! crashes Debian 12's lavapipe at the first compute pipeline, so no target enables it.
//!
//! `EMBER_WGPU_BACKENDS` ([`BACKENDS_ENV`]) limits the graphics APIs the probe enumerates: a comma
//! list of `vulkan`, `metal`, `dx12`, `gl`, or `none` to hide every adapter (how the tests play a
//! machine without a GPU on one that has one). Unset, the probe looks at Vulkan, Metal and DX12.
//!
//! On Linux, `auto` first looks for a GPU device node (`/dev/dri/renderD*`, `/dev/nvidia*`,
//! `/dev/dxg`): a hardware adapter needs one, so without it ember falls back to the CPU at once,
//! without loading the Vulkan stack (which costs tens of MiB of RSS, and whose window-system
//! probes print errors on a headless board).
//!
//! An adapter that lacks what the kernels need (compute shaders, 64-unit workgroups, four storage
//! buffers per stage, 1 KiB of workgroup memory) is skipped with a message. If the device then
//! fails to come up, the caller gets [`Placement::Cpu`] with the reason, never a crash.

use std::fmt;
use std::str::FromStr;

/// Whether this binary has the GPU backend (the `wgpu` feature) compiled in.
pub const GPU_COMPILED: bool = cfg!(feature = "wgpu");

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Cpu,
    Wgpu,
    Vulkan,
    Metal,
    Cuda,
}

impl BackendChoice {
    pub const NAMES: [&'static str; 6] = ["auto", "cpu", "wgpu", "vulkan", "metal", "cuda"];
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => BackendChoice::Auto,
            "cpu" => BackendChoice::Cpu,
            "wgpu" | "gpu" => BackendChoice::Wgpu,
            "vulkan" => BackendChoice::Vulkan,
            "metal" => BackendChoice::Metal,
            "cuda" => BackendChoice::Cuda,
            _ => {
                return Err(format!(
                    "unknown backend '{s}' (expected one of: {})",
                    Self::NAMES.join(", ")
                ));
            }
        })
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::NAMES[*self as usize])
    }
}

/// One wgpu adapter, as the log and the benchmark record describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    /// "discrete", "integrated", "virtual", "software" or "other".
    pub kind: &'static str,
    /// Graphics API: "vulkan", "metal", "dx12", ...
    pub api: String,
    pub driver: String,
    /// Why the kernels cannot run on it, if they cannot.
    pub unusable: Option<String>,
}

impl Adapter {
    pub fn is_hardware(&self) -> bool {
        matches!(self.kind, "discrete" | "integrated" | "virtual")
    }
}

impl fmt::Display for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.kind, self.api)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        f.write_str(")")
    }
}

/// The decision.
#[derive(Clone, Debug)]
pub enum Placement {
    Cpu {
        reason: String,
    },
    #[cfg(feature = "wgpu")]
    Gpu {
        device: burn::tensor::Device,
        adapter: Adapter,
    },
}

impl Placement {
    /// "cpu", "wgpu" or "cuda", as stored with benchmark runs.
    pub fn backend(&self) -> &'static str {
        match self {
            Placement::Cpu { .. } => "cpu",
            #[cfg(feature = "wgpu")]
            Placement::Gpu { adapter, .. } if adapter.api == CUDA_API => "cuda",
            #[cfg(feature = "wgpu")]
            Placement::Gpu { .. } => "wgpu",
        }
    }
    /// One line for the log and for stderr.
    pub fn describe(&self) -> String {
        match self {
            Placement::Cpu { reason } => format!("backend: cpu ({reason})"),
            #[cfg(feature = "wgpu")]
            Placement::Gpu { adapter, .. } => {
                format!("backend: {} on {adapter}", self.backend())
            }
        }
    }
}

/// The `api` of a CUDA placement's [`Adapter`].
pub const CUDA_API: &str = "cuda";

/// Whether this binary has the CUDA runtime (the `cuda` feature) compiled in.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// Quiets the GPU probe on a machine without a graphical session.
///
/// Without `XDG_RUNTIME_DIR` (a board reached over SSH, a container), Mesa's implicit Vulkan
/// device-selection layer, which looks for a display to rank GPUs by, prints "error:
/// XDG_RUNTIME_DIR is invalid or not set in the environment." for every Vulkan instance the
/// probe creates: a user reads "error" and thinks something broke. ember ranks adapters itself,
/// so there the layer is switched off with its own switch, `NODEVICE_SELECT=1`, unless the user
/// set that variable.
///
/// # Safety
/// Sets an environment variable: call it before any other thread exists (first thing in
/// `main`), as `std::env::set_var` requires.
pub unsafe fn quiet_headless_probe() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && std::env::var_os("NODEVICE_SELECT").is_none()
    {
        // SAFETY: the caller guarantees no other thread reads or writes the environment.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

/// The environment variable that limits the APIs the GPU probe enumerates (see the module docs).
pub const BACKENDS_ENV: &str = "EMBER_WGPU_BACKENDS";

/// The APIs named by a [`BACKENDS_ENV`] value.
#[cfg(feature = "wgpu")]
fn parse_backends(spec: &str) -> Result<wgpu::Backends, String> {
    let mut b = wgpu::Backends::empty();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        b |= match name.to_ascii_lowercase().as_str() {
            "none" => wgpu::Backends::empty(),
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            _ => {
                return Err(format!(
                    "{BACKENDS_ENV}='{spec}': unknown API '{name}' (vulkan, metal, dx12, gl, none)"
                ));
            }
        };
    }
    Ok(b)
}

/// The APIs to probe: [`BACKENDS_ENV`], else Vulkan, Metal and DX12.
#[cfg(feature = "wgpu")]
fn probe_backends() -> Result<wgpu::Backends, String> {
    match std::env::var(BACKENDS_ENV) {
        Ok(spec) => parse_backends(&spec),
        Err(_) => Ok(wgpu::Backends::PRIMARY),
    }
}

/// Whether this machine has a GPU device node that a hardware adapter would need (Linux;
/// elsewhere always `Ok`). The error says where it looked.
#[cfg(feature = "wgpu")]
fn gpu_device_node() -> Result<(), &'static str> {
    #[cfg(target_os = "linux")]
    {
        let any = |dir: &str, prefix: &str| {
            std::fs::read_dir(dir).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
            })
        };
        if any("/dev/dri", "renderD") || any("/dev", "nvidia") || any("/dev", "dxg") {
            Ok(())
        } else {
            Err("no GPU device node (/dev/dri/renderD*, /dev/nvidia*, /dev/dxg)")
        }
    }
    #[cfg(not(target_os = "linux"))]
    Ok(())
}

/// Every adapter wgpu reports on the APIs the probe looks at, in wgpu's order.
#[cfg(feature = "wgpu")]
pub fn adapters() -> Vec<Adapter> {
    raw_adapters()
        .unwrap_or_default()
        .into_iter()
        .map(|(a, _)| a)
        .collect()
}

#[cfg(not(feature = "wgpu"))]
pub fn adapters() -> Vec<Adapter> {
    Vec::new()
}

#[cfg(feature = "wgpu")]
fn raw_adapters() -> Result<Vec<(Adapter, wgpu::DeviceType)>, String> {
    let backends = probe_backends()?;
    if backends.is_empty() {
        return Ok(vec![]);
    }
    let desc = wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    };
    let instance = wgpu::Instance::new(desc);
    let list = futures_lite::future::block_on(instance.enumerate_adapters(backends));
    Ok(list
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            let kind = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => "discrete",
                wgpu::DeviceType::IntegratedGpu => "integrated",
                wgpu::DeviceType::VirtualGpu => "virtual",
                wgpu::DeviceType::Cpu => "software",
                wgpu::DeviceType::Other => "other",
            };
            let limits = a.limits();
            let down = a.get_downlevel_capabilities();
            let unusable = if !down.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
                Some("no compute shaders".to_string())
            } else if limits.max_compute_workgroup_size_x < 64
                || limits.max_compute_invocations_per_workgroup < 64
            {
                Some(format!(
                    "workgroups of {} units (ember needs 64)",
                    limits.max_compute_workgroup_size_x
                ))
            } else if limits.max_storage_buffers_per_shader_stage < 4 {
                Some(format!(
                    "{} storage buffers per stage (ember needs 4)",
                    limits.max_storage_buffers_per_shader_stage
                ))
            } else if limits.max_compute_workgroup_storage_size < 1024 {
                Some(format!(
                    "{} bytes of workgroup memory (ember needs 1024)",
                    limits.max_compute_workgroup_storage_size
                ))
            } else {
                None
            };
            let driver = [info.driver.as_str(), info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            let ad = Adapter {
                name: info.name.clone(),
                kind,
                api: format!("{:?}", info.backend).to_lowercase(),
                driver,
                unusable,
            };
            (ad, info.device_type)
        })
        .collect())
}

/// Decide where to run. Never fails: anything that prevents the GPU path becomes a CPU
/// placement with the reason.
pub fn choose(choice: BackendChoice) -> Placement {
    if choice == BackendChoice::Cpu {
        return Placement::Cpu {
            reason: "--backend cpu".into(),
        };
    }
    if choice == BackendChoice::Cuda {
        #[cfg(feature = "cuda")]
        return match cuda::choose() {
            Ok(p) => p,
            Err(reason) => Placement::Cpu { reason },
        };
        #[cfg(not(feature = "cuda"))]
        return Placement::Cpu {
            reason: "this ember was built without the cuda feature (cargo build --release \
                     --features cuda)"
                .into(),
        };
    }
    // `auto`: CUDA first where the driver's device nodes are there.
    #[cfg(feature = "cuda")]
    let cuda_skipped = if choice == BackendChoice::Auto && cuda::device_node() {
        match cuda::choose() {
            Ok(p) => return p,
            Err(why) => Some(why),
        }
    } else {
        None
    };
    #[cfg(not(feature = "wgpu"))]
    {
        Placement::Cpu {
            reason: format!("this ember was built without the wgpu feature (asked for {choice})"),
        }
    }
    #[cfg(feature = "wgpu")]
    {
        let p = gpu::choose(choice);
        #[cfg(feature = "cuda")]
        if let (Placement::Cpu { reason }, Some(why)) = (&p, cuda_skipped) {
            return Placement::Cpu {
                reason: format!("{reason}; CUDA: {why}"),
            };
        }
        p
    }
}

/// The CUDA placement: device 0 through burn's CUDA runtime, brought up and smoke-tested
/// (which loads the driver and compiles a kernel with NVRTC) with any panic caught.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    /// Whether the NVIDIA driver's device nodes exist (Linux; elsewhere assume they may).
    pub(super) fn device_node() -> bool {
        #[cfg(target_os = "linux")]
        {
            std::path::Path::new("/dev/nvidiactl").exists()
        }
        #[cfg(not(target_os = "linux"))]
        true
    }

    pub(super) fn choose() -> Result<Placement, String> {
        if !device_node() {
            return Err("no NVIDIA driver device node (/dev/nvidiactl)".into());
        }
        let r = gpu::quietly(|| {
            let device = burn::tensor::Device::cuda(0);
            gpu::smoke_test(&device).map(|()| device)
        });
        let device = r.map_err(|why| format!("CUDA device 0 failed to start: {why}"))?;
        Ok(Placement::Gpu {
            device,
            adapter: Adapter {
                name: "CUDA device 0".into(),
                kind: "discrete",
                api: CUDA_API.into(),
                driver: String::new(),
                unusable: None,
            },
        })
    }
}

#[cfg(feature = "wgpu")]
mod gpu {
    use super::*;
    use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

    fn rank(kind: &str) -> u8 {
        match kind {
            "discrete" => 0,
            "integrated" => 1,
            "virtual" => 2,
            "software" => 3,
            _ => 4,
        }
    }

    pub(super) fn choose(choice: BackendChoice) -> Placement {
        if choice == BackendChoice::Auto
            && let Err(why) = gpu_device_node()
        {
            return Placement::Cpu {
                reason: why.to_string(),
            };
        }
        let all = match raw_adapters() {
            Ok(all) => all,
            Err(reason) => return Placement::Cpu { reason },
        };
        let wanted_api = match choice {
            BackendChoice::Vulkan => Some("vulkan"),
            BackendChoice::Metal => Some("metal"),
            _ => None,
        };
        let mut skipped = Vec::new();
        let mut best: Option<(usize, &Adapter, wgpu::DeviceType)> = None;
        for (i, (a, ty)) in all.iter().enumerate() {
            if wanted_api.is_some_and(|api| a.api != api) {
                continue;
            }
            if choice == BackendChoice::Auto && !a.is_hardware() {
                skipped.push(format!("{a}: not a hardware GPU"));
                continue;
            }
            if let Some(why) = &a.unusable {
                skipped.push(format!("{a}: {why}"));
                continue;
            }
            if best.is_none_or(|(_, b, _)| rank(a.kind) < rank(b.kind)) {
                best = Some((i, a, *ty));
            }
        }
        let Some((idx, adapter, ty)) = best else {
            let mut reason = match (choice, wanted_api) {
                (_, Some(api)) => format!("--backend {choice}: no usable {api} adapter"),
                (BackendChoice::Auto, _) => "no hardware GPU adapter".to_string(),
                _ => format!("--backend {choice}: no usable GPU adapter"),
            };
            if std::env::var_os(BACKENDS_ENV).is_some() {
                reason.push_str(&format!(
                    " ({BACKENDS_ENV}={} limits the APIs probed)",
                    std::env::var(BACKENDS_ENV).unwrap_or_default()
                ));
            }
            if all.is_empty() {
                reason.push_str(" (wgpu found no adapter at all; on Linux install a Vulkan driver, e.g. mesa-vulkan-drivers)");
            } else if !skipped.is_empty() {
                reason.push_str(&format!(" (skipped: {})", skipped.join("; ")));
            }
            return Placement::Cpu { reason };
        };
        // burn selects adapters by type and index within that type, in wgpu's order.
        let nth = all[..idx].iter().filter(|(_, t)| *t == ty).count();
        let kind = match ty {
            wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(nth),
            wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(nth),
            wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(nth),
            wgpu::DeviceType::Cpu => DeviceKind::Cpu,
            wgpu::DeviceType::Other => DeviceKind::DefaultDevice,
        };
        let device = Device::wgpu(kind);
        match smoke_test(&device) {
            Ok(()) => Placement::Gpu {
                device,
                adapter: adapter.clone(),
            },
            Err(why) => Placement::Cpu {
                reason: format!("{adapter} failed to start: {why}"),
            },
        }
    }

    /// `f` with panics caught and not printed (a driver stack that cannot start panics), as
    /// an error message.
    pub(super) fn quietly<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        std::panic::set_hook(hook);
        match r {
            Ok(r) => r,
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())),
        }
    }

    /// Bring the device up and run one op, catching (and not printing) a panic from the
    /// driver stack.
    pub(super) fn smoke_test(device: &Device) -> Result<(), String> {
        let d = device.clone();
        quietly(move || {
            let t = Tensor::<1>::from_data(TensorData::new(vec![1f32, 2.0, 3.0, 4.0], [4]), &d);
            let v = (t * 2.0)
                .into_data()
                .try_to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            if v == [2.0, 4.0, 6.0, 8.0] {
                Ok(())
            } else {
                Err(format!("wrong result {v:?}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name_and_rejects_others() {
        for n in BackendChoice::NAMES {
            assert_eq!(n.parse::<BackendChoice>().unwrap().to_string(), n);
        }
        let e = "rocm".parse::<BackendChoice>().unwrap_err();
        assert!(e.contains("auto, cpu, wgpu, vulkan, metal, cuda"), "{e}");
    }

    /// `--backend cuda` where it cannot run (no `cuda` feature, or no NVIDIA driver, as on the
    /// machines CI runs on) is a CPU placement with the reason, which the CLI turns into an
    /// error; it never panics.
    #[test]
    fn cuda_without_a_driver_says_why() {
        match choose(BackendChoice::Cuda) {
            Placement::Cpu { reason } => assert!(
                reason.contains("cuda feature")
                    || reason.contains("NVIDIA driver")
                    || reason.contains("failed to start"),
                "{reason}"
            ),
            // Only where the driver is there (a GPU machine), and then it is CUDA.
            #[cfg(feature = "wgpu")]
            p => assert!(CUDA_COMPILED && p.backend() == "cuda", "{}", p.describe()),
        }
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn the_backends_variable_names_apis_or_none() {
        assert_eq!(parse_backends("none"), Ok(wgpu::Backends::empty()));
        assert_eq!(parse_backends(""), Ok(wgpu::Backends::empty()));
        assert_eq!(
            parse_backends("vulkan, GL"),
            Ok(wgpu::Backends::VULKAN | wgpu::Backends::GL)
        );
        let e = parse_backends("vulkan,cuda").unwrap_err();
        assert!(e.contains("unknown API 'cuda'"), "{e}");
    }

    #[test]
    fn cpu_is_always_cpu() {
        assert_eq!(choose(BackendChoice::Cpu).backend(), "cpu");
    }
}
