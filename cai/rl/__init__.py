"""Our own PPO for language models: pure maths (ppo_math), model wrappers, rewards and the loop (trainer)."""
