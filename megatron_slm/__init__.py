"""Rho-1 Selective Language Modeling (SLM) on megatron-core. The idea: megatron_slm.slm."""
