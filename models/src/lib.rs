//! Networks for adjoint-dpm: no adjoint code here.
