"""Moshi's two streams as plain numbers, for code that runs before (or without) a Mimi or an LM: the
websocket client, the speech fixtures, training-data checks, reading input audio. Code holding a model reads
the model's own values instead (`mimi.sample_rate`, `mimi.frame_size`, `lm.text_padding_token_id`).
No imports: the light clients use it. tests/models/test_streams.py pins these to moshi 0.2.13's."""

SAMPLE_RATE = 24000  # Hz, Mimi's audio
FRAME_RATE = 12.5  # Hz, Mimi frames = LM steps
FRAME = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples = one 80 ms frame
TEXT_PADDING_IDS = (0, 3)  # text ids that are not text: end-of-padding (0) and padding (3); moshi's server skips both


def words_of(pieces):
    """The whitespace-separated words of consecutive text pieces (SentencePiece's "▁" counts as a space):
    `pieces` yields (piece, fields); each word is {"word": str, **fields of the piece it starts in}."""
    words: list[dict] = []
    new_word = True
    for piece, fields in pieces:
        for ch in piece.replace("▁", " "):
            if ch.isspace():
                new_word = True
            elif new_word:
                words.append({"word": ch, **fields})
                new_word = False
            else:
                words[-1]["word"] += ch
    return words
