//! Choosing the accelerator: KVM where the CPU exposes hardware virtualisation and /dev/kvm
//! opens, TCG (QEMU's emulator) everywhere else.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM if [`kvm_usable`], else TCG.
    pub fn detect() -> Accel {
        if kvm_usable() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The name QEMU's `-accel` option takes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?} (expected kvm or tcg)")),
        }
    }
}

/// True when /proc/cpuinfo shows `vmx` or `svm` and /dev/kvm opens read-write.
pub fn kvm_usable() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo_has_virt(&flags) && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// True when a /proc/cpuinfo text lists the `vmx` (Intel VT-x) or `svm` (AMD-V) flag.
pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, f)| f.split_whitespace().any(|w| w == "vmx" || w == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_virt("processor\t: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpuinfo_has_virt("flags\t\t: fpu svm\n"));
        assert!(!cpuinfo_has_virt("flags\t\t: fpu vme sse svmx\n"));
        assert!(!cpuinfo_has_virt("model name\t: vmx svm\n"));
    }

    #[test]
    fn parse_and_serde() {
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        assert!("hvf".parse::<Accel>().unwrap_err().contains("hvf"));
        assert_eq!(serde_json::to_string(&Accel::Tcg).unwrap(), "\"tcg\"");
    }

    #[test]
    fn detect_matches_this_machine() {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpuinfo_has_virt(&cpu) {
            assert_eq!(Accel::detect(), Accel::Tcg);
        }
    }
}
