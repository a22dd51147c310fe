"""Helpers shared by the test suites: processes, ports and the reference broker."""
