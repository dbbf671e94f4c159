"""The nvlm_* lmms-eval tasks: YAML files and the functions they name (`!function utils.NAME`)."""
