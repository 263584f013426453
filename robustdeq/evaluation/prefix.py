"""Old name of ``combined_card`` (one card from an undefended and a defended evaluation), kept for old imports."""

from .combined_card import combine_cards, load_evaluation

__all__ = ["combine_cards", "load_evaluation"]
