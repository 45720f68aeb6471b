"""t2f.trainer: fits the mapper on pairs the generator makes itself.

Not built yet: this package is empty until `t2f-train` lands (issue 3).
"""
