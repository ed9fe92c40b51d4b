"""One module per page. Each is run by st.navigation as a script (`__name__ == "__main__"`),
and calls `viewer.frame.run_page(render)`."""
