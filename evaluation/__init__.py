"""Floor 2: metrics, statistics (intervals, bootstrap) and calibration; numbers in, numbers out."""
