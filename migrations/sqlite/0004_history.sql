-- History is ordered and paged by (created_at, id), newest first. Each filter index ends in
-- those columns, so a filtered page (with or without from/to) is read in index order and
-- stops after one page instead of walking the table.
drop index pushes_app_idx;
drop index pushes_status_idx;
drop index pushes_client_idx;
create index pushes_app_created_idx on pushes (app, created_at desc, id desc);
create index pushes_status_created_idx on pushes (status, created_at desc, id desc);
create index pushes_client_created_idx on pushes (client, created_at desc, id desc);
