"""pcam-lens viewer: a Streamlit app to look at what the model does and where it goes wrong.

    streamlit run viewer/app.py

The viewer holds no training, metric or inference logic: pages read widgets, call `model/`,
and draw. `app.py` is the entry (sidebar + st.navigation), `state.py` the persisted settings and
cached loaders, `components.py` the drawing helpers, `views/` one small module per page.
"""
