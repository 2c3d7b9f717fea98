"""A local two-server Orthanc lab and a synthetic DICOM cohort, for tests, demo and benchmarks."""
