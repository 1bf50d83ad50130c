//! Choosing the accelerator: KVM where the CPU exposes hardware virtualisation and /dev/kvm
//! opens, TCG (QEMU's emulator) everywhere else. The accelerator type itself is the contract's
//! ([`vgrid_api::vm::Accel`]).

pub use vgrid_api::vm::Accel;

/// KVM if [`kvm_usable`], else TCG.
pub fn detect() -> Accel {
    if kvm_usable() {
        Accel::Kvm
    } else {
        Accel::Tcg
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
    fn detect_matches_this_machine() {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpuinfo_has_virt(&cpu) {
            assert_eq!(detect(), Accel::Tcg);
        }
    }
}
