import numpy as np

from muki_ray.config.labels import LabelSpace


def test_disjoint_union_in_teacher_order():
    s = LabelSpace.from_teachers({"b": ["sport", "tech"], "a": ["business", "politics", "entertainment"]})
    assert s.names == ("sport", "tech", "business", "politics", "entertainment")
    assert s.index["business"] == 2
    np.testing.assert_array_equal(s.positions[0], [0, 1])
    np.testing.assert_array_equal(s.positions[1], [2, 3, 4])
    assert s.overlapping == ()
    assert s.owners["politics"] == ("a",)
    assert s.owner_mask().sum(axis=1).tolist() == [2, 3]


def test_overlapping_labels_are_one_union_label():
    s = LabelSpace.from_teachers({"t1": ["x", "shared"], "t2": ["shared", "y", "z"]})
    assert s.names == ("x", "shared", "y", "z")
    np.testing.assert_array_equal(s.positions[1], [1, 2, 3])
    assert s.owners["shared"] == ("t1", "t2")
    assert s.overlapping == ("shared",)
    mask = s.owner_mask()
    assert mask[:, 1].all() and mask.sum() == 5
    assert "(overlap)" in s.describe()


def test_encode_unknown_is_missing():
    s = LabelSpace.from_teachers({"t": ["a", "b"]})
    assert s.encode(["b", "zzz", None, "a"]).tolist() == [1, -1, -1, 0]
