"""`make bench`: side-by-side measurements in one run, printed as ratios. Not part of the tests."""
