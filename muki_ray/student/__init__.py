"""The student: distributed training under Ray Train and DeepSpeed ZeRO (`training`), its state on
disk and its export (`checkpoint`), evaluation of a classifier folder (`evaluate`), and the warm start of a
grown student (`warm_start`, `head_probe`).
"""
