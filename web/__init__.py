"""The web demo: a Streamlit page that searches the catalogue through the client library (app.py)."""
