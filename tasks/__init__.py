"""The science stages of a detector, and the daytime de-duplication of DiaObjects."""
