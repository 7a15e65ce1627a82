"""Developer tools: ahead-of-time kernel compilation reports."""
