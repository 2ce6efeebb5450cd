"""PEFT Lab's grading tools: release generation, safe parallel autograding, feedback."""
