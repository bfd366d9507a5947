"""Calibration of the analytical cost model against measured Megatron step times."""
