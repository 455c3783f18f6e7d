"""De-identification: keyed pseudonyms, tabular Safe Harbor rules, DICOM PS3.15 Annex E, and
metadata stripping of JPEG and PNG files. Runs before anything is written under data/."""
