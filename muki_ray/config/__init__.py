"""The run config: the pydantic schema (`schema.RunConfig`, the one source of defaults), the YAML
file and `--set` overrides (`config_file.load_config`), the label space (`labels.label_space`), the checks
run before any work (`preflight`) and the generated schema table (`schema_doc`).
"""
