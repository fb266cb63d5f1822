"""Interoperation with other diffusion libraries: fastdiff networks and schedules in their formats."""
