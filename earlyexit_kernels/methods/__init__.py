"""What each exit method is, independent of how it runs: the policies users build
(:mod:`.policies`), their text form for the command line (:mod:`.policy_spec`), the
reference exit step in plain PyTorch (:mod:`.exit_rules`) and the training losses
(:mod:`.losses`). Nothing here imports the rest of the package.
"""
