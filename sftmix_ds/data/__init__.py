from .formats import Conversation, DataError, load_conversations, require_final_answer
from .tokenize import Example, encode, end_of_turn_token, load_examples, load_split
from .batching import Batches, collate
