//! vgrid hostagent (to be written).
