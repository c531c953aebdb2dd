//! Load generator and verifier behind `txoutbox-stress` (being written).
