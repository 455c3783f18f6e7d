"""medloop: the command line of the continuous-training loop."""
