//! Where a model is evaluated (`--device`), and the one place that picks the backend for it.

/// Where a model is evaluated: `--device cpu`, `cuda[:N]` or `auto` (the default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// An NVIDIA GPU by index.
    Cuda(usize),
    /// CUDA when a GPU backend is available, otherwise the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            l => l
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("'{s}' is not cpu, cuda, cuda:N or auto")),
        }
    }
}

impl Device {
    /// The backend that runs for this choice, as reports state it.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu | Device::Auto => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// Checks that this build can evaluate on the device. `auto` picks the CPU. `cuda[:N]` probes
    /// the device (without a driver: "no NVIDIA driver found"; a bad index: how many there are) and,
    /// while the CUDA evaluator is incomplete, is refused even where the device exists.
    pub fn check(&self) -> anyhow::Result<()> {
        match self {
            Device::Cpu | Device::Auto => Ok(()),
            Device::Cuda(n) => {
                let d = super::cuda::probe(*n)
                    .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))?;
                anyhow::bail!(
                    "--device cuda:{n}: found {} (compute capability {}.{}), but kiln's CUDA \
                     evaluator is not complete yet (its kernels land in later commits); evaluate \
                     with --device cpu",
                    d.name,
                    d.capability.0,
                    d.capability.1
                )
            }
        }
    }
}

/// The model every evaluation runs: on the CPU backend until a GPU backend lands.
pub type Evaluator = super::Model<super::cpu::CpuBackend>;

/// Loads `file` for evaluation on `device`: the one place the backend is chosen.
pub fn load(
    file: std::sync::Arc<kiln_formats::gguf::GgufFile>,
    device: &Device,
) -> anyhow::Result<Evaluator> {
    device.check()?;
    super::Model::load(file, super::cpu::CpuBackend)
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn device_parses_and_cuda_is_refused_clearly() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("auto".parse(), Ok(Device::Auto));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert_eq!("CPU".parse(), Ok(Device::Cpu));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!(Device::Cpu.check().is_ok() && Device::Auto.check().is_ok());
        let e = Device::Cuda(1).check().unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("--device cpu"), "{e}");
        // no driver on this machine or in CI; where there is one, the evaluator is not complete
        let why = if super::super::cuda::driver_present() {
            "not complete yet"
        } else {
            "no NVIDIA driver found"
        };
        let e = Device::Cuda(0).check().unwrap_err().to_string();
        assert!(e.contains(why) || e.contains("no CUDA device 0"), "{e}");
    }
}
