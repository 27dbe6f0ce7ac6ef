# Stand-in for Slicer's build tree, used by Testing/test_cmake_extension.py to configure the
# extension without Slicer. The three macros have the argument keywords of the real ones
# (checked against Slicer's CMake/SlicerMacroBuildScriptedModule.cmake,
# CMake/SlicerMacroPythonTesting.cmake and CTK's CMake/ctkMacroCompilePythonScript.cmake):
# unknown keywords, missing mandatory arguments and nonexistent files are fatal errors, and
# every file a macro is given is recorded (one "<macro>|<kind>|<absolute path>" line) in
# ${CMAKE_BINARY_DIR}/gvsl_manifest.txt for the test to compare with the source tree.
# Any other CMake command the extension calls and that Slicer would provide is unknown here,
# so configuring fails on it, as it would on a real Slicer build for a misspelt macro.
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
