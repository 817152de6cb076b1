"""Shared plumbing every stage uses: Hugging Face folders (`hf_folder`), devices and precision
(`hardware`), stage manifests (`manifest`), the Ray Data stage idiom (`stage.Stage`, `stage.stage_options`),
progress and the console (`progress`, `console`), joining Ray (`cluster.connect`) and test-only fault
hooks (`faults`). Imports no other folder.
"""
