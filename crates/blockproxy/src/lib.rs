//! vgrid blockproxy (to be written).
