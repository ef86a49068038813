"""Building blocks shared by the towers, the mining module and the LLMs."""
