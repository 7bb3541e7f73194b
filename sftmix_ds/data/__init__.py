from .formats import Conversation, DataError, load_conversations, require_final_answer
from .store import Example, TokenStore, example_ids, example_lengths, examples_digest
from .tokenize import encode, end_of_turn_token, load_examples, load_split, train_conversations, train_split
from .batching import Batches, collate
