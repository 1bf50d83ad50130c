//! How a value is written into a QEMU option (`key=value,key=value`), shared by the command
//! line's parts.

use std::path::Path;

/// QEMU option values are comma-separated lists: a literal comma is written twice.
pub(crate) fn qopt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}
