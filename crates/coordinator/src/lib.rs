//! vgrid coordinator (to be written).
