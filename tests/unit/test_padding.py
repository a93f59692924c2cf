"""Which image counts are compiled, and when a batch is padded up to one of them."""

from worker.pipeline import cheapest_count, compiled_image_counts


def test_one_image_and_the_largest_batch_are_compiled_by_default() -> None:
    assert compiled_image_counts(8) == [1, 8]
    assert compiled_image_counts(1) == [1]


def test_a_batch_is_padded_only_where_the_padded_render_was_measured_faster() -> None:
    # Launch-bound small batches: padding 3 to 4 costs nothing and runs compiled.
    costs = {1: 0.20, 2: 0.45, 3: 0.47, 4: 0.30, 5: 0.60, 8: 0.90}
    compiled = {1, 4, 8}
    assert cheapest_count(3, costs, compiled) == 4
    assert cheapest_count(2, costs, compiled) == 4
    # Compute-bound large batches: 5 eager beats 8 compiled, so no padding.
    assert cheapest_count(5, costs, compiled) == 5
    assert cheapest_count(4, costs, compiled) == 4


def test_no_measurement_means_no_padding() -> None:
    assert cheapest_count(3, {}, {1, 8}) == 3
    assert cheapest_count(3, {8: 0.1}, {1, 8}) == 3
    assert cheapest_count(9, {9: 1.0, 8: 0.5}, {1, 8}) == 9
