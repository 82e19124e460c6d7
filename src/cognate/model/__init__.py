"""The Cognate model: transformer core, recursive refinement, ACT halting, long-term memory."""
