import numpy as np

import dreamer_atari as da


def fill(buffer, steps, start=0, episode_len=None):
    """Entry t carries action t and an obs whose pixels all equal t % 256; episodes start every `episode_len`."""
    for t in range(start, start + steps):
        n = buffer.num_envs
        first = np.full(n, episode_len is not None and t % episode_len == 0)
        obs = np.full((n, 1, 64, 64), t % 256, np.uint8)
        buffer.add(obs, np.full(n, t), np.full(n, 0.5), np.zeros(n, bool), first)


def make(**kw):
    defaults = dict(num_envs=1, capacity=100, obs_shape=(1, 64, 64), batch_size=3, seq_len=5)
    return da.ReplayBuffer(**{**defaults, **kw})


def test_frames_are_stored_once_as_uint8():
    buffer = make(num_envs=2, capacity=1000)
    assert buffer.obs.dtype == np.uint8
    assert buffer.obs.shape == (2, 500, 1, 64, 64)  # capacity is shared between the env streams, no frame stack
    assert buffer.nbytes == 1000 * (64 * 64 + 8 + 4 + 1 + 1)


def test_consecutive_chunks_continue_each_row():
    buffer = make()
    fill(buffer, 60)
    first = buffer.sample()
    assert first["is_first"][:, 0].all()  # rows start fresh: zero state
    fill(buffer, 5, start=60)  # every row now has its next chunk stored
    second = buffer.sample()
    np.testing.assert_array_equal(second["action"][:, 0], first["action"][:, -1] + 1)
    np.testing.assert_array_equal(np.diff(second["action"], axis=1), 1)
    assert not second["is_first"].any()  # the trainer carries the state over
    np.testing.assert_array_equal(second["obs"][:, :, 0, 0, 0], second["action"] % 256)


def test_row_restarts_when_it_reaches_the_newest_data():
    buffer = make(batch_size=1)
    fill(buffer, 10)
    buffer.row_env[0], buffer.row_pos[0] = 0, 7  # the chunk 7..11 is not written yet
    chunk = buffer.sample()
    assert chunk["is_first"][0, 0]
    assert 0 <= chunk["action"][0, 0] and chunk["action"][0, -1] <= 9


def test_evicted_rows_restart_inside_the_stored_window():
    buffer = make(capacity=20)
    fill(buffer, 20)
    buffer.sample()
    fill(buffer, 40, start=20)  # the ring has wrapped twice: every row's next position was overwritten
    chunk = buffer.sample()
    assert chunk["is_first"][:, 0].all()
    assert (chunk["action"] >= 40).all() and (chunk["action"] <= 59).all()
    np.testing.assert_array_equal(np.diff(chunk["action"], axis=1), 1)  # windows across the ring's seam are whole


def test_is_first_marks_episode_starts_inside_chunks():
    buffer = make(batch_size=8, seq_len=10)
    fill(buffer, 90, episode_len=7)
    fill(buffer, 10, start=90, episode_len=7)
    buffer.sample()
    chunk = buffer.sample()
    expected = chunk["action"] % 7 == 0
    expected[:, 0] |= chunk["is_first"][:, 0]  # a restarted row may also be flagged at its first step
    np.testing.assert_array_equal(chunk["is_first"], expected)
    assert chunk["is_first"][:, 1:].any()


def test_uniform_mode_restarts_every_row_every_time():
    buffer = make(mode="uniform", batch_size=16)
    fill(buffer, 100)
    for _ in range(3):
        chunk = buffer.sample()
        assert chunk["is_first"][:, 0].all()
        np.testing.assert_array_equal(np.diff(chunk["action"], axis=1), 1)


def test_recency_prefers_new_data():
    starts = {}
    for recency in (0.0, 5.0):
        buffer = make(capacity=1000, batch_size=256, mode="uniform", recency=recency)
        fill(buffer, 1000)
        starts[recency] = np.concatenate([buffer.sample()["action"][:, 0] for _ in range(8)])
    newest = 1000 - 5
    assert abs(starts[0.0].mean() - newest / 2) < 40  # uniform over 0..995
    assert starts[5.0].mean() > newest * 6 / 7 - 30  # density 6 x^5 has mean 6/7
    assert starts[5.0].max() <= newest


def test_streams_of_several_envs_stay_apart():
    buffer = make(num_envs=3, capacity=300, batch_size=32)
    for t in range(100):
        obs = np.stack([np.full((1, 64, 64), 10 * e, np.uint8) for e in range(3)])
        buffer.add(obs, np.arange(3) + 100 * t, np.zeros(3), np.zeros(3, bool), np.zeros(3, bool))
    chunk = buffer.sample()
    env = chunk["obs"][:, :, 0, 0, 0] // 10
    assert (env == env[:, :1]).all()  # a chunk never mixes env streams
    np.testing.assert_array_equal(chunk["action"] % 100, env)
