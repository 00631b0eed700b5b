"""N-gram drafts (prompt lookup): if the context ends with tokens seen before, guess that
what followed them then follows now.

For n from `max_n` down to `min_n`: find the latest earlier occurrence of the context's last
n tokens; the first n with one proposes the (up to) k tokens after it.

    context   a b c d x y a b c ?            n = 3: suffix "a b c" (positions 6..8)
              0 1 2 3 4 5 6 7 8              earlier "a b c" ends at 2 -> drafts "d x y"

The search is vectorised: one comparison of the whole context with its last token gives the
candidate ends (numpy, about 40 us at 128k tokens), then each further suffix token only
filters the surviving candidates. Candidates of n + 1 tokens are a subset of those of n, so
the longest match is the last non-empty set. When candidates are many (a model repeating
one token for thousands of steps: every position is one), filtering them by index would
cost a gather each; a boolean mask over the context, narrowed by shifted comparisons, costs
a few passes at memory speed instead, and the latest match is found from the end.

Each request keeps its tokens in a growing numpy buffer, so a step copies only the tokens
it added (never the whole context).
"""

from __future__ import annotations

import numpy as np

from cpserve.request import Request

# Above this many candidate ends, the mask search (fewer passes over memory than gathers).
DENSE_CANDIDATES = 2048


def find_drafts(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` with min_n <= length <= max_n; empty if there is none."""
    total = tokens.shape[0]
    if k <= 0 or total < min_n + 1:
        return tokens[:0]
    # Candidate ends of an earlier occurrence: never the suffix itself (its end is
    # total - 1), and always with at least one token after them.
    first = tokens[:total - 1] == tokens[total - 1]
    ends = np.flatnonzero(first)
    end = (_latest_match_sparse(tokens, ends, min_n, max_n) if ends.size <= DENSE_CANDIDATES
           else _latest_match_dense(tokens, first, min_n, max_n))
    if end is None:
        return tokens[:0]
    return tokens[end + 1:end + 1 + k]


def _latest_match_sparse(tokens: np.ndarray, ends: np.ndarray, min_n: int,
                         max_n: int) -> int | None:
    """Filter the candidate ends suffix token by suffix token."""
    total = tokens.shape[0]
    best = ends if min_n <= 1 else None
    for back in range(1, max_n):
        ends = ends[ends >= back]
        ends = ends[tokens[ends - back] == tokens[total - 1 - back]]
        if ends.size == 0:
            break
        if back + 1 >= min_n:
            best = ends
    return int(best[-1]) if best is not None and best.size else None


def _latest_match_dense(tokens: np.ndarray, mask: np.ndarray, min_n: int,
                        max_n: int) -> int | None:
    """The same on a mask of the context: mask[e] while the n tokens ending at e match.

        mask_n[e] = mask_{n-1}[e] and tokens[e - n + 1] == tokens[total - n]
    """
    total = tokens.shape[0]
    best = None
    for n in range(1, max_n + 1):
        if n > 1:
            back = n - 1
            mask[back:] &= tokens[:total - 1 - back] == tokens[total - 1 - back]
            mask[:back] = False
        from_end = int(mask[::-1].argmax())  # numpy stops at the first True
        if not mask[total - 2 - from_end]:
            break
        if n >= min_n:
            best = total - 2 - from_end
    return best


class TokenHistory:
    """One request's tokens in a numpy buffer that doubles when full."""

    def __init__(self) -> None:
        self.buffer = np.empty(256, dtype=np.int32)
        self.length = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """Append what `token_ids` (the request's tokens so far) has beyond the buffer."""
        new = len(token_ids) - self.length
        if new > 0:
            if len(token_ids) > self.buffer.shape[0]:
                grown = np.empty(max(2 * self.buffer.shape[0], len(token_ids)), dtype=np.int32)
                grown[:self.length] = self.buffer[:self.length]
                self.buffer = grown
            self.buffer[self.length:len(token_ids)] = token_ids[self.length:]
            self.length = len(token_ids)
        return self.buffer[:self.length]


class NgramProposer:
    """Drafts for the requests of the driver, from their prompt and output tokens."""

    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        self.k, self.min_n, self.max_n = num_speculative_tokens, min_n, max_n
        self._histories: dict[str, TokenHistory] = {}

    def propose(self, request: Request, num_drafts: int) -> list[int]:
        """Drafts for `request`'s next step, at most `num_drafts` (<= K) of them."""
        history = self._histories.get(request.request_id)
        if history is None or history.length > request.num_tokens:  # new, or recomputed
            history = self._histories[request.request_id] = TokenHistory()
        tokens = history.sync(request.all_token_ids)
        return find_drafts(tokens, self.min_n, self.max_n, min(num_drafts, self.k)).tolist()

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._histories.pop(request_id, None)
