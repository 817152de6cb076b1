"""The pipeline's Ray stages, in data-flow order: the teachers' MC-Dropout predictions
(`teachers.TeacherStage`, run side by side by `schedule`, cached per teacher by `cache`), the prototypes'
embeddings (`embedding.EmbeddingStage`), the combiner that streams the targets (`combiner`) and the optional
refine rounds (`refine_stage`).
"""
