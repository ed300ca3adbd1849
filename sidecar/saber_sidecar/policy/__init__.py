"""Admission policies: pure decision code shared by the sidecar and the simulator."""
