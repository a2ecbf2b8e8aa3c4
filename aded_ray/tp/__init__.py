"""Tensor-parallel verification: a group of DeepSpeed AutoTP rank actors behind the verifier interface."""
