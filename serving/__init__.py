"""Triton serving for MEDOE (SPEC §9): image processing, the embedded server and its model repository."""
